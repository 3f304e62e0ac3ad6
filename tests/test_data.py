"""Data: synthetic tasks (determinism, disjoint splits, correct answers, reachable Countdown targets),
prompt templates, TokenizedDataset, JSONL rows and their errors, GSM8K through a mocked tfds."""

import itertools
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from grpo_jax.data import (
    PLAIN,
    R1_ZERO,
    REASONING_INSTRUCTIONS,
    ArithmeticTask,
    ChatTemplate,
    CountdownTask,
    TextTemplate,
    TokenizedDataset,
    load_gsm8k,
    load_jsonl,
)
from grpo_jax.data.gsm8k import parse_gsm8k_record
from grpo_jax.tokenizers import CharTokenizer, HFTokenizer

CHAR = CharTokenizer()
HF_DIR = Path(__file__).parent / "fixtures" / "hf" / "tokenizer"

# ---------------------------------------------------------------------------------------- ArithmeticTask


def test_arithmetic_is_deterministic_by_index():
    task = ArithmeticTask(digits=3, ops=("+", "-", "*", "/"), seed=7, size=500)
    again = ArithmeticTask(digits=3, ops=("+", "-", "*", "/"), seed=7, size=500)
    assert [again[i] for i in (499, 3, 250, 0)] == [task[i] for i in (499, 3, 250, 0)]
    assert task[-1] == task[499]
    assert list(task) == [task[i] for i in range(500)]  # Sequence iteration stops at size
    assert task[0] != ArithmeticTask(digits=3, ops=("+", "-", "*", "/"), seed=8, size=500)[0]
    with pytest.raises(IndexError, match="ArithmeticTask index 500 is out of range for length 500"):
        task[500]


def test_arithmetic_answers_are_correct():
    task = ArithmeticTask(digits=3, ops=("+", "-", "*", "/"), size=400)
    seen_ops = set()
    for example in task:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*/]) (\d+)\?", example["prompt"]).groups()
        a, b = int(a), int(b)
        expected = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op]
        assert Fraction(int(example["answer"])) == expected, example
        assert (example["op"], example["operands"]) == (op, [a, b])
        # operands have exactly 3 digits; for "/" the divisor and the quotient do
        assert 100 <= b <= 999 and 100 <= (int(example["answer"]) if op == "/" else a) <= 999
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*", "/"}


def test_arithmetic_splits_never_share_an_operand_pair():
    def pairs(split, seed):
        task = ArithmeticTask(digits=2, ops=("+", "-", "*", "/"), split=split, seed=seed, size=2000)
        return {frozenset(example["operands"]) for example in task}

    train = pairs("train", 0) | pairs("train", 1)
    test = pairs("test", 0) | pairs("test", 1)
    assert not train & test
    # 2-digit "+" has 4,095 unordered pairs; about test_fraction=0.1 of them are test pairs
    plus_test = {frozenset(e["operands"]) for e in ArithmeticTask(digits=2, split="test", size=3000)}
    assert 300 <= len(plus_test) <= 520


def test_arithmetic_rejects_bad_options():
    with pytest.raises(ValueError, match=r"ops=\('\^',\) must be a non-empty subset"):
        ArithmeticTask(ops=("^",))
    with pytest.raises(ValueError, match="split='valid' is not supported"):
        ArithmeticTask(split="valid")
    with pytest.raises(ValueError, match="digits=0 must be >= 1"):
        ArithmeticTask(digits=0)


# ----------------------------------------------------------------------------------------- CountdownTask


def reachable(values, target):
    """Brute force: can all of `values` be combined with + - * / (any order, exact rationals) into target?"""
    if len(values) == 1:
        return values[0] == target
    for i, j in itertools.permutations(range(len(values)), 2):
        a, b = values[i], values[j]
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        results = {a + b, a - b, a * b} | ({a / b} if b else set())
        if any(reachable([*rest, r], target) for r in results):
            return True
    return False


def test_reachable_solver_is_not_vacuous():
    assert reachable([Fraction(3), Fraction(5), Fraction(7)], 22)  # 3 * 5 + 7
    assert not reachable([Fraction(1), Fraction(1)], 5)


@pytest.mark.parametrize("num_numbers", [3, 4])
def test_countdown_targets_are_reachable(num_numbers):
    task = CountdownTask(num_numbers=num_numbers, max_target=100, size=60)
    for example in task:
        numbers, target = example["numbers"], example["target"]
        assert len(numbers) == num_numbers and all(1 <= n <= 100 for n in numbers)
        assert 1 <= target <= 100 and example["answer"] == str(target)
        assert example["prompt"] == (f"Using the numbers {numbers}, create an equation that equals {target}. "
                                     "You can use +, -, * and /, and must use each number exactly once.")
        # the recorded solution uses each number once and evaluates to the target
        assert sorted(int(n) for n in re.findall(r"\d+", example["solution"])) == sorted(numbers)
        assert eval(example["solution"]) == target
        assert reachable([Fraction(n) for n in numbers], target), example


def test_countdown_is_deterministic_and_splits_are_disjoint():
    task = CountdownTask(num_numbers=3, seed=3, size=1000)
    assert [CountdownTask(num_numbers=3, seed=3, size=1000)[i] for i in (0, 999, 17)] == [task[i] for i in
                                                                                          (0, 999, 17)]

    def problems(split):
        return {(tuple(sorted(e["numbers"])), e["target"]) for e in CountdownTask(num_numbers=3, split=split,
                                                                                  size=1000)}

    train, test = problems("train"), problems("test")
    assert len(test) > 900 and not train & test


# ---------------------------------------------------------------------------------------------- templates


def test_text_templates_render_the_question():
    example = {"prompt": "What is 1 + 2?", "answer": "3"}
    assert PLAIN(example, CHAR) == "What is 1 + 2?\n"
    assert R1_ZERO(example, CHAR) == f"{REASONING_INSTRUCTIONS}\nUser: What is 1 + 2?\nAssistant: <think>"
    assert "<think> </think>" in REASONING_INSTRUCTIONS and "<answer> </answer>" in REASONING_INSTRUCTIONS
    assert TextTemplate("Q: {question} {{json}}")(example, CHAR) == "Q: What is 1 + 2? {json}"
    with pytest.raises(ValueError, match=r"placeholder \{question\} exactly once and no other, found \[\]"):
        TextTemplate("no placeholder")
    with pytest.raises(ValueError, match=r"found \['question', 'answer'\]"):
        TextTemplate("{question} {answer}")


def test_chat_template_uses_the_tokenizer():
    example = {"prompt": "What is 1 + 2?", "answer": "3"}
    assert ChatTemplate()(example, CHAR) == "User: What is 1 + 2?\nAssistant:"
    assert ChatTemplate(system="Be brief.")(example, CHAR) == ("System: Be brief.\nUser: What is 1 + 2?\n"
                                                               "Assistant:")


# --------------------------------------------------------------------------------------- TokenizedDataset


def test_tokenized_dataset_with_char_tokenizer():
    examples = [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": "What is 10 - 4?", "answer": "6"}]
    ds = TokenizedDataset(examples, CHAR, PLAIN)
    assert len(ds) == 2 and ds.max_prompt_length == len("What is 10 - 4?\n")
    assert ds[0] == {"prompt": "What is 1 + 2?", "answer": "3", "prompt_text": "What is 1 + 2?\n",
                     "prompt_tokens": CHAR.encode("What is 1 + 2?\n")}
    assert ds[-1]["prompt_tokens"][:4] == [62, 21, 14, 33]  # "What"
    assert CHAR.decode(ds[1]["prompt_tokens"]) == "What is 10 - 4?\n"
    assert all(type(t) is int for t in ds[1]["prompt_tokens"])
    assert [e["answer"] for e in ds] == ["3", "6"]
    with pytest.raises(IndexError):
        ds[2]


def test_tokenized_dataset_over_a_synthetic_task():
    task = CountdownTask(size=20)
    ds = TokenizedDataset(task, CHAR, R1_ZERO, max_prompt_tokens=1000)
    assert len(ds) == 20
    assert ds[5] == {**task[5], "prompt_text": R1_ZERO(task[5], CHAR),
                     "prompt_tokens": CHAR.encode(R1_ZERO(task[5], CHAR))}


def test_tokenized_dataset_with_hf_tokenizer_and_chat_template():
    tokenizer = HFTokenizer.from_dir(HF_DIR)
    ds = TokenizedDataset([{"prompt": "What is 12 + 30?", "answer": "42"}], tokenizer,
                          ChatTemplate(system="Be brief."))
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert ds[0]["prompt_text"] == text
    assert ds[0]["prompt_tokens"] == tokenizer.encode(text)
    assert tokenizer.decode(ds[0]["prompt_tokens"], skip_special=False) == text


def test_tokenized_dataset_errors_name_the_example():
    examples = [{"prompt": "short", "answer": "1"}, {"prompt": "x" * 30, "answer": "2"}]
    too_long = r"examples\[1\] has a 31-token prompt, longer than max_prompt_tokens=20"
    with pytest.raises(ValueError, match=too_long):
        TokenizedDataset(examples, CHAR, PLAIN, max_prompt_tokens=20)
    assert len(TokenizedDataset(examples, CHAR, PLAIN, max_prompt_tokens=31)) == 2
    no_prompt = r"examples\[1\]: example has no string 'prompt' field \(got \['answer', 'question'\]\)"
    with pytest.raises(ValueError, match=no_prompt):
        TokenizedDataset([examples[0], {"question": "q", "answer": "a"}], CHAR)
    with pytest.raises(ValueError, match=r"examples\[0\] renders to an empty prompt"):
        TokenizedDataset([{"prompt": "", "answer": ""}], CHAR, TextTemplate("{question}"))
    with pytest.raises(ValueError, match="examples is empty"):
        TokenizedDataset([], CHAR)


# ------------------------------------------------------------------------------------------------- JSONL


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_jsonl_gsm8k_format(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "Cost of 2 books at $540 each?", "answer": "2 * 540 = 1,080\n#### 1,080", "id": 9}]
    path = write_jsonl(tmp_path / "gsm.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])
    assert load_jsonl(path) == [
        {"prompt": rows[0]["question"], "answer": "7", "solution": rows[0]["answer"]},
        {"id": 9, "prompt": rows[1]["question"], "answer": "1,080", "solution": rows[1]["answer"]},
    ]


def test_load_jsonl_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", ['{"problem": "2 + 2?", "target": 4, "level": 1}'])
    assert load_jsonl(path, question_field="problem", answer_field="target", answer_after=None) == [
        {"level": 1, "prompt": "2 + 2?", "answer": "4"}]


@pytest.mark.parametrize("bad_row, message", [
    ('{"question": "q", "answer": "#### 1"',
     "line 2: not valid JSON (Expecting ',' delimiter, column 37); fix or remove the line."),
    ("{'question': 'q', 'answer': '#### 1'}",
     "line 2: not valid JSON (Expecting property name enclosed in double quotes, column 2); fix or remove "
     "the line."),
    ("[" * 100_000 + "]" * 100_000, "line 2: not valid JSON (nested too deep); fix or remove the line."),
    ('["q", "#### 1"]', "line 2: expected a JSON object {...}, got list; each line is one example."),
    ('{"answer": "#### 1"}', "line 2: field 'question' is missing (the row has ['answer']); fix the row or "
     "pass question_field= the field that holds it."),
    ('{"question": "q"}', "line 2: field 'answer' is missing (the row has ['question']); fix the row or pass "
     "answer_field= the field that holds it."),
    ('{"question": 5, "answer": "#### 1"}',
     "line 2: field 'question' must be a str, got int 5; fix the row."),
    ('{"question": ["q"], "answer": "#### 1"}',
     "line 2: field 'question' must be a str, got list ['q']; fix the row."),
    ('{"question": " \\n", "answer": "#### 1"}',
     "line 2: field 'question' is blank; give the question text, or remove the line."),
    ('{"question": "q", "answer": null}',
     "line 2: field 'answer' must be a str or int, got NoneType None; fix the row."),
    ('{"question": "q", "answer": "no marker"}', "line 2: field 'answer' does not contain '#### ' (value "
     "'no marker'); fix the row, or pass answer_after=None to use the whole field as the answer."),
    ('{"question": "q", "answer": "2 + 2 = 4\\n####   "}', "line 2: field 'answer' has nothing after its "
     "last '#### ' (value '2 + 2 = 4\\n####   '); write the final answer after it."),
], ids=["truncated-json", "single-quotes", "nested-too-deep", "not-object", "no-question", "no-answer",
        "int-question", "list-question", "blank-question", "null-answer", "no-marker", "empty-final"])
def test_load_jsonl_malformed_rows(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "data.jsonl", ['{"question": "q", "answer": "#### 1"}', bad_row])
    with pytest.raises(ValueError) as error:
        load_jsonl(path)
    assert str(error.value) == f"{path}, {message}"


def test_load_jsonl_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError) as error:
        load_jsonl(path)
    assert str(error.value) == (f"{path} has 2 lines, all blank: no examples. Write one JSON object per "
                                'line, e.g. {"question": ..., "answer": ...}.')
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as error:
        load_jsonl(path, question_field="problem", answer_field="solution")
    assert str(error.value) == (f"{path} is empty: no examples. Write one JSON object per line, e.g. "
                                '{"problem": ..., "solution": ...}.')


def test_load_jsonl_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n\n'
                     + '{"question": "Caf\u00e9?", "answer": "#### 2"}\n'.encode("latin-1"))
    with pytest.raises(ValueError) as error:
        load_jsonl(path)
    assert str(error.value) == (f"{path}, line 3: not valid UTF-8 (byte 0xe9 at byte 18 of the line); "
                                "re-save the file as UTF-8.")


def test_load_jsonl_accepts_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "Caf\xc3\xa9?", "answer": "#### 1"}\r\n\r\n'
                     b'{"question": "q2", "answer": "#### 2"}\r\n')
    assert load_jsonl(path) == [{"prompt": "Caf\u00e9?", "answer": "1", "solution": "#### 1"},
                                {"prompt": "q2", "answer": "2", "solution": "#### 2"}]


def test_load_jsonl_missing_file_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as error:
        load_jsonl(path)
    assert str(error.value) == f"JSONL file {path} not found; check the path."
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load_jsonl("data/train.jsonl")
    assert str(error.value) == (f"JSONL file data/train.jsonl not found (a relative path, read from "
                                f"{Path.cwd()}); check the path.")
    with pytest.raises(IsADirectoryError) as error:
        load_jsonl(tmp_path)
    assert str(error.value) == (f"{tmp_path} is a directory; pass the path of a .jsonl file (one JSON object "
                                "per line).")


# ------------------------------------------------------------------------------------------------- GSM8K


def testparse_gsm8k_record():
    record = {"question": b"Tom has 3 apples and buys 4. How many?", "answer": b"3 + 4 = <<3+4=7>>7\n#### 7",
              "annotation": b"3 + 4 = <<3+4=7>>7\n", "short_answer": b"7"}
    assert parse_gsm8k_record(record) == {"prompt": "Tom has 3 apples and buys 4. How many?", "answer": "7",
                                           "solution": "3 + 4 = <<3+4=7>>7\n#### 7"}
    assert parse_gsm8k_record({"question": "q", "answer": "#### 12 "})["answer"] == "12"
    with pytest.raises(ValueError, match=r"rec 3: field 'answer' does not contain '#### '"):
        parse_gsm8k_record({"question": "q", "answer": "12"}, where="rec 3")
    with pytest.raises(ValueError, match=r"record: field 'question' must be text \(bytes or str\), got None"):
        parse_gsm8k_record({"answer": "#### 1"})
    with pytest.raises(ValueError) as error:
        parse_gsm8k_record({"question": b"Caf\xe9?", "answer": b"#### 1"}, where="gsm8k['test'][4]")
    assert str(error.value) == ("gsm8k['test'][4]: field 'question' is not valid UTF-8 (byte 0xe9 at byte "
                                "4); re-prepare the dataset.")
    with pytest.raises(ValueError) as error:
        parse_gsm8k_record({"question": "q", "answer": "1 + 1 = 2\n#### "}, where="rec 5")
    assert str(error.value) == ("rec 5: field 'answer' has nothing after its last '#### ' (value '1 + 1 = "
                                "2\\n#### '); GSM8K answers end with '#### <final answer>'.")


def test_load_gsm8k_through_tfds_data_source(tmp_path):
    splits = {
        "train": [{"question": "Ann’s 2 cats get 3 more. How many cats?".encode(),  # UTF-8 bytes, as tfds
                   "answer": b"2 + 3 = <<2+3=5>>5\n#### 5"}],
        "test": [{"question": b"A pen costs $2. What do 6 pens cost?",
                  "answer": b"6 * 2 = <<6*2=12>>12\n#### 12"},
                 {"question": b"What is 10 - 1?", "answer": b"#### 9"}],
    }

    def as_data_source(builder, split, **kwargs):
        assert builder.name == "gsm8k"
        return splits[split]

    policy = tfds.testing.MockPolicy.USE_CODE
    with tfds.testing.mock_data(policy=policy, as_data_source_fn=as_data_source):
        assert load_gsm8k("test", data_dir=str(tmp_path)) == [
            {"prompt": "A pen costs $2. What do 6 pens cost?", "answer": "12",
             "solution": "6 * 2 = <<6*2=12>>12\n#### 12"},
            {"prompt": "What is 10 - 1?", "answer": "9", "solution": "#### 9"}]
        assert load_gsm8k("train") == [{"prompt": "Ann’s 2 cats get 3 more. How many cats?", "answer": "5",
                                        "solution": "2 + 3 = <<2+3=5>>5\n#### 5"}]

    # tfds's own random mock (real ArrayRecordDataSource class, random text): no '#### ', a clear error.
    with tfds.testing.mock_data(num_examples=3, policy=policy):
        with pytest.raises(ValueError, match=r"gsm8k\['test'\]\[0\]: field 'answer' does not contain '####"):
            load_gsm8k("test")
