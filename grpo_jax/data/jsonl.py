"""Local JSON Lines files -> examples, with a field mapping (GSM8K's own format is the default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grpo_jax.data.dataset import Example

GSM8K_MARKER = "#### "  # GSM8K solutions end with "#### <final answer>"


def text_after(text: str, marker: str) -> str | None:
    """The stripped text after the last `marker` in `text`, or None when `marker` does not occur."""
    _, found, tail = text.rpartition(marker)
    return tail.strip() if found else None


def _field(row: dict[str, Any], name: str, option: str, where: str, types: tuple[type, ...]) -> Any:
    if name not in row:
        raise ValueError(f"{where}: field {name!r} is missing (the row has {sorted(row)}); fix the row or "
                         f"pass {option}= the field that holds it.")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise ValueError(f"{where}: field {name!r} must be a {expected}, got {type(value).__name__} "
                         f"{value!r:.80}; fix the row.")
    return value


def _open_lines(path: Path):
    """`path` opened for reading bytes; a missing path or a directory raises naming the path."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the path of a .jsonl file (one JSON object per "
                                "line).")
    try:
        return path.open("rb")
    except FileNotFoundError as e:
        relative = "" if path.is_absolute() else f" (a relative path, read from {Path.cwd()})"
        raise FileNotFoundError(f"JSONL file {path} not found{relative}; check the path.") from e


def _decode(raw: bytes, where: str, first: bool) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")  # a byte-order mark may open the file
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                         "line); re-save the file as UTF-8.") from e


def load_jsonl(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_after: str | None = GSM8K_MARKER,
) -> list[Example]:
    """Read one example per non-blank line of a UTF-8 JSONL file.

    Each row is a JSON object. Its `question_field` (a non-blank string) becomes "prompt". Its
    `answer_field` (a string, or an integer turned into one) becomes "answer"; when `answer_after` is set,
    "answer" is the stripped text after the last `answer_after` and the whole field is kept as "solution".
    The row's other fields are kept as they are. For GSM8K's own files the defaults give
    `{"prompt": question, "answer": "18", "solution": "Janet sells ... #### 18"}`.

    Raises FileNotFoundError naming the path when it does not exist, and ValueError naming the file, the
    1-based line number and the field when a line is not UTF-8 or not valid JSON, not an object, lacks a
    field, has a field of the wrong type or a blank one, or lacks `answer_after` or an answer after it;
    and when the file holds no rows.
    """
    path = Path(path).expanduser()
    examples, num_lines = [], 0
    with _open_lines(path) as lines:
        for line_number, raw in enumerate(lines, start=1):
            num_lines = line_number
            where = f"{path}, line {line_number}"
            line = _decode(raw, where, first=line_number == 1).rstrip("\r\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.pos + 1}); fix or remove the "
                                 "line.") from e
            except RecursionError as e:
                raise ValueError(f"{where}: not valid JSON (nested too deep); fix or remove the line.") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object {{...}}, got {type(row).__name__}; each "
                                 "line is one example.")
            question = _field(row, question_field, "question_field", where, (str,))
            if not question.strip():
                raise ValueError(f"{where}: field {question_field!r} is blank; give the question text, or "
                                 f"remove the line.")
            answer = str(_field(row, answer_field, "answer_field", where, (str, int)))
            extra = {k: v for k, v in row.items() if k not in (question_field, answer_field)}
            if answer_after is None:
                examples.append({**extra, "prompt": question, "answer": answer})
                continue
            final = text_after(answer, answer_after)
            if final is None:
                raise ValueError(f"{where}: field {answer_field!r} does not contain {answer_after!r} "
                                 f"(value {answer!r:.80}); fix the row, or pass answer_after=None to use the "
                                 "whole field as the answer.")
            if not final:
                raise ValueError(f"{where}: field {answer_field!r} has nothing after its last "
                                 f"{answer_after!r} (value {answer!r:.80}); write the final answer after it.")
            examples.append({**extra, "prompt": question, "answer": final, "solution": answer})
    if not examples:
        content = "is empty" if num_lines == 0 else f"has {num_lines} lines, all blank"
        example = f"{{{json.dumps(question_field)}: ..., {json.dumps(answer_field)}: ...}}"
        raise ValueError(f"{path} {content}: no examples. Write one JSON object per line, e.g. {example}.")
    return examples
