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


def load_jsonl(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_after: str | None = GSM8K_MARKER,
) -> list[Example]:
    """Read one example per non-blank line of a JSONL file.

    Each row is a JSON object. Its `question_field` (a string) becomes "prompt". Its `answer_field` (a
    string, or an integer turned into one) becomes "answer"; when `answer_after` is set, "answer" is the
    stripped text after the last `answer_after` and the whole field is kept as "solution". The row's other
    fields are kept as they are. For GSM8K's own files the defaults give
    `{"prompt": question, "answer": "18", "solution": "Janet sells ... #### 18"}`.

    Raises ValueError naming the file, the 1-based row (line) number and the field when a row is not valid
    JSON, not an object, lacks a field, has a field of the wrong type, or lacks `answer_after`.
    """
    path = Path(path).expanduser()
    examples = []
    with path.open(encoding="utf-8") as lines:
        for row_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, row {row_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); fix or remove the "
                                 "row.") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object {{...}}, got {type(row).__name__}; each "
                                 "row is one example.")
            question = _field(row, question_field, "question_field", where, (str,))
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
            examples.append({**extra, "prompt": question, "answer": final, "solution": answer})
    if not examples:
        raise ValueError(f"{path} holds no rows; a dataset needs at least one example.")
    return examples
