"""Reward functions: exact rewards on real-looking, malformed and adversarial completions; fuzzing for no
exception and bounded time; combine() weights, metrics and failure handling."""

import functools
import logging
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_jax import rewards
from grpo_jax.rewards import (
    accuracy_reward,
    combine,
    equation_reward,
    extract_answer,
    format_reward,
    language_consistency_reward,
    length_penalty,
    safe_arithmetic,
)

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
MEGABYTE = 1_000_000
NESTED = "(" * 10_000 + "1" + ")" * 10_000

ACCURACY_CASES = [  # (completion, reference, reward)
    ("<think>48 / 2 = 24 in May, 48 + 24 = 72.</think>\n<answer>72</answer>", GSM8K_SOLUTION, 1.0),
    ("<think>48 + 48 = 96</think><answer>96</answer>", GSM8K_SOLUTION, 0.0),
    ("She sold 24 in May, so 72 in total.", "72", 1.0),  # no marker: the last number
    ("So the answer is 72. Check: 72 - 24 = 48.", "72", 0.0),  # ... which here is 48
    ("Thus $\\boxed{\\frac{3}{4}}$ of the cake is left.", "0.75", 1.0),
    ("\\boxed{-\\dfrac{1}{2}}", "-1/2", 1.0),
    ("The total is $1,234.", "1234", 1.0),
    ("It costs 12 dollars.", 12, 1.0),
    ("<answer>12%</answer>", "12", 1.0),
    ("<answer>72.0</answer>", "#### 72", 1.0),
    ("<answer>0.333</answer>", "1/3", 0.0),  # exact comparison, no tolerance
    ("<answer>1/3</answer>", Fraction(1, 3), 1.0),
    ("<answer>0.1</answer>", 0.1, 1.0),
    ("<answer>\u22125</answer>", "-5", 1.0),  # Unicode minus sign
    ("<answer>5</answer>", "-5", 0.0),
    ("x = 10-3", "3", 1.0),  # subtraction, not a negative number
    ("<answer>3</answer> wait, no: <answer>4</answer>", "4", 1.0),  # the last answer counts
    ("<answer>The answer is \\boxed{9} (not 8).</answer>", "9", 1.0),  # boxed inside the answer tag
    ("#### 7\nThat was easy, 10/10.", "7", 1.0),  # the line after ####
    ("<answer>I do not know</answer> but maybe 5", "5", 0.0),  # a marker without a number: no answer
    ("\\boxed{}", "0", 0.0),
    ("<answer>5", "5", 1.0),  # unclosed tag: the last number of the text
    ("\\boxed{" + "{" * 10_000 + "42", "42", 1.0),  # never-closed \boxed is ignored
    ("<answer>9**9**9</answer>", "387420489", 0.0),  # answers are read, never evaluated
    ("<answer>" + "1" + "0" * 1000 + "</answer>", "7", 0.0),  # a 1001-digit number is not read
    ("The answer is " + "9" * MEGABYTE, "9", 0.0),
    (NESTED + "\n#### 1", "1", 1.0),
    (NESTED, "1", 0.0),  # the 1 lies before the last ANSWER_TAIL_CHARS
    ("<div><answer><b>72</b></answer></div><script>alert(1)</script>", "72", 1.0),
    ("\x00<answer>\x0072\x00</answer>\x00", "72", 1.0),
    ("<think>我们先算 3 + 4，然后 check it.</think><answer>7</answer>", "7", 1.0),
    ("blah " * (MEGABYTE // 5) + "#### 72", "72", 1.0),
    ("<answer>72</answer>" + "x" * MEGABYTE, "72", 0.0),  # only the last ANSWER_TAIL_CHARS are read
]


@pytest.mark.parametrize("completion, reference, expected", ACCURACY_CASES)
def test_accuracy_reward(completion, reference, expected):
    assert accuracy_reward(["q"], [completion], answer=[reference]) == [expected]


def test_extract_answer_values():
    assert extract_answer(GSM8K_SOLUTION) == 72
    assert extract_answer("\\boxed{\\frac{3}{4}}") == Fraction(3, 4)
    assert extract_answer("1{,}234.50 euros") == Fraction(123450, 100)
    assert extract_answer("2/0") is None
    assert extract_answer("no number here") is None


EXTRACT_CASES = [  # (text, value): numbers read as written, powers never evaluated nor split
    ("1e6", 1_000_000),
    ("3.0e6", 3_000_000),
    ("<answer>1e6</answer>", 1_000_000),
    ("The total is 1.5E+3 dollars.", 1500),
    ("#### 2.5e-3", Fraction(1, 400)),
    ("1e100", 10**100),
    ("1e101", None),  # exponent beyond MAX_DECIMAL_EXPONENT: not read
    ("1e999999999", None),  # ... and never built as a billion-digit number
    ("She bought 3 eggs", 3),  # an "e" without exponent digits is a word
    ("2^6", None),
    ("<answer>2^6</answer>", None),
    ("2 ^ 6", None),
    ("2**6", None),
    ("10^{-3}", None),
    ("2^-6", None),
    ("2^(6)", None),
    ("(1+2)^2", None),
    ("10\u2076", None),  # a superscript exponent
    ("1.5 \\times 10^6", None),
    ("2^x", None),  # the base of a power
    ("The area is 25 m^2.", 25),  # a unit's exponent is skipped
    ("\\boxed{25 \\text{ cm}^2}", 25),
    ("x^2", None),
    ("x^2 = 16, so x = 4", 4),
    ("1,000", 1000),
    ("1,000,000.5", Fraction(2_000_001, 2)),
    ("-5", -5),
    ("3.50", Fraction(7, 2)),
    ("$5", 5),
    (".5", Fraction(1, 2)),
    ("-.5", Fraction(-1, 2)),
    ("so the answer is...72", 72),  # an ellipsis is not a decimal point
    ("5-3", 3),
    ("-1,000.5e-3/2", Fraction(-2001, 4000)),
]


@pytest.mark.parametrize("text, value", EXTRACT_CASES)
def test_extract_answer_scientific_notation_and_powers(text, value):
    assert extract_answer(text) == value


@pytest.mark.parametrize("completion, reference, expected", [
    ("<answer>1e6</answer>", "1000000", 1.0),
    ("<answer>1e6</answer>", "6", 0.0),
    ("<answer>3.0e6</answer>", "#### 3,000,000", 1.0),
    ("<answer>2^6</answer>", "6", 0.0),
    ("<answer>2^6</answer>", "64", 0.0),  # read, never evaluated
])
def test_accuracy_reward_scientific_notation_and_powers(completion, reference, expected):
    assert accuracy_reward(["q"], [completion], answer=[reference]) == [expected]


ADVERSARIAL = 100_000
ADVERSARIAL_CASES = [  # 100k-character strings built to make a backtracking number pattern blow up
    ("1e" * (ADVERSARIAL // 2), 10),
    ("2^" * (ADVERSARIAL // 2) + "2", None),
    ("m^2 " * (ADVERSARIAL // 4), None),
    ("1," * (ADVERSARIAL // 2), 1),
    ("1." * (ADVERSARIAL // 2), Fraction(11, 10)),
    (("1" * 99 + "e") * (ADVERSARIAL // 100), None),  # numbers too long to read
    ("1" + " " * ADVERSARIAL + "^2", None),
    ("^{" * (ADVERSARIAL // 2) + "7", None),
    ("**" * (ADVERSARIAL // 2) + "7", None),
    ("e-" * (ADVERSARIAL // 2) + "8", 8),  # "e-8": a minus after a letter is subtraction
    ("1e-1e-" * (ADVERSARIAL // 6) + "9", 9),
    ("\\frac{1}{" * (ADVERSARIAL // 9) + "4}", Fraction(1, 4)),
    ("9" * ADVERSARIAL + "e5", None),
    ("2\u2076" * (ADVERSARIAL // 2), None),
]


@pytest.mark.parametrize("text, value", ADVERSARIAL_CASES, ids=[repr(t[:12]) for t, _ in ADVERSARIAL_CASES])
def test_extract_answer_on_adversarial_100k_strings(text, value):
    assert len(text) >= ADVERSARIAL - 12
    start = time.perf_counter()
    assert extract_answer(text) == value
    assert accuracy_reward(["q"], [text], answer=["7"]) == [float(value == 7)]
    assert time.perf_counter() - start < 2.0  # a generous bound: matching is linear, not a benchmark


def test_accuracy_reward_rejects_bad_references():
    with pytest.raises(ValueError, match=r"answer\[1\]='N/A' has no numeric final answer"):
        accuracy_reward(["q", "q"], ["1", "2"], answer=["1", "N/A"])
    with pytest.raises(ValueError, match="'answer' has 1 values; expected a list of 2"):
        accuracy_reward(["q", "q"], ["1", "2"], answer=["1"])


FORMAT_CASES = [  # (completion, strict reward, lenient reward)
    ("<think>6 * 7 = 42</think><answer>42</answer>", 1.0, 1.0),
    ("  <think>\n6 * 7 = 42\n</think>\n\n<answer>\n42\n</answer>\n", 1.0, 1.0),
    ("<think>a</think> So: <answer>42</answer>", 0.0, 1.0),
    ("Sure! <think>a</think><answer>42</answer>", 0.0, 1.0),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0, 1.0),
    ("<think><think></think></think><answer></answer>", 0.0, 1.0),
    ("<answer>42</answer><think>a</think>", 0.0, 0.0),
    ("<think>a</think><answer>42", 0.0, 0.0),
    ("<think>a<answer>42</answer>", 0.0, 0.0),
    ("42", 0.0, 0.0),
    ("", 0.0, 0.0),
    ("\x00<think>\x00</think><answer>\x00</answer>", 0.0, 1.0),
    ("<think>" + "a" * MEGABYTE + "</think><answer>1</answer>", 1.0, 1.0),
    ("<think>" * 100_000, 0.0, 0.0),
]


@pytest.mark.parametrize("completion, strict, lenient", FORMAT_CASES)
def test_format_reward(completion, strict, lenient):
    assert format_reward(["q"], [completion], strict=True) == [strict]
    assert format_reward(["q"], [completion]) == [lenient]


LANGUAGE_CASES = [  # (completion, target script, reward)
    ("<think>First add the numbers.</think><answer>7</answer>", "latin", 1.0),
    ("<think>我们先计算</think><answer>seven</answer>", "latin", 0.0),  # only the reasoning counts
    ("<think>我们先计算</think>", "cjk", 1.0),
    ("<think>先算ab</think>", "cjk", 0.5),
    ("推理ab</think><answer>xyz</answer>", "cjk", 0.5),  # <think> opened by the prompt
    ("<think>Сначала add</think>", "cyrillic", 0.7),
    ("<think>مرحبا</think>", "arabic", 1.0),
    ("<think>计算 \\frac{3}{4} + 1 = 1.75</think>", "cjk", 1.0),  # LaTeX commands do not count
    ("<think>𝑥 + 𝑦 是 ℝ</think>", "cjk", 1.0),  # nor mathematical letters
    ("<think>ＡＢ</think>", "latin", 1.0),  # fullwidth Latin is Latin
    ("12 + 3 = 15", "latin", 1.0),  # no letters
    ("", "cjk", 1.0),
    ("\x00\x00abc\x00<b>", "latin", 1.0),
    ("中a" * (MEGABYTE // 2), "cjk", 0.5),  # the first LANGUAGE_SCAN_CHARS characters are read
]


@pytest.mark.parametrize("completion, script, expected", LANGUAGE_CASES)
def test_language_consistency_reward(completion, script, expected):
    assert language_consistency_reward(["q"], [completion], target_script=script) == [expected]


def test_language_consistency_reward_rejects_unknown_script():
    with pytest.raises(ValueError, match="target_script='klingon' is not supported"):
        language_consistency_reward(["q"], ["a"], target_script="klingon")


def test_length_penalty():
    completions = ["", "x" * 10, "x" * 11, "x" * 12, "x" * 14, "x" * MEGABYTE]
    penalties = length_penalty([""] * 6, completions, max_chars=10, ramp_chars=4)
    assert penalties == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="ramp_chars=0"):
        length_penalty(["q"], ["x"], ramp_chars=0)


EQUATION_CASES = [  # (answer text, reward) for numbers [3, 5, 2] and target 16
    ("<answer>(3 + 5) * 2</answer>", 1.0),
    ("<answer> (5 + 3) * 2 = 16 </answer>", 1.0),
    ("<think>try 3 * 5 + 2</think><answer>3 * 5 + 2</answer>", 0.0),  # 17
    ("<answer>(3 + 5) * 2 * 1</answer>", 0.0),  # 1 is not given
    ("<answer>8 * 2</answer>", 0.0),  # does not use the numbers
    ("<answer>(3 + 5) * 2 + (3 - 3)</answer>", 0.0),  # 3 used three times
    ("(3 + 5) * 2", 0.0),  # no answer tag
    ("<answer>9**9**9</answer>", 0.0),
    ("<answer>__import__('os').system('rm -rf /')</answer>", 0.0),
    ("<answer>" + NESTED + "</answer>", 0.0),
    ("<answer>(3 + 5) * 2\x00</answer>", 0.0),
]


@pytest.mark.parametrize("completion, expected", EQUATION_CASES)
def test_equation_reward(completion, expected):
    assert equation_reward(["q"], [completion], numbers=[[3, 5, 2]], target=[16]) == [expected]


def test_equation_reward_is_exact():
    assert equation_reward(["q"], ["<answer>10 / 3 * 3</answer>"], numbers=[[10, 3, 3]], target=[10]) == [1.0]
    assert equation_reward(["q"], ["<answer>1 / 3</answer>"], numbers=[np.array([3, 1])],
                           target=np.array([0.333])) == [0.0]


SAFE_ARITHMETIC_CASES = [  # (expression, value)
    ("(1 + 2) * 3", Fraction(9)),
    ("7/2", Fraction(7, 2)),
    ("0.1 + 0.2", Fraction(3, 10)),  # decimal literals are exact
    ("1/3 + 1/3 + 1/3", Fraction(1)),
    ("2 ** 2 ** 3", Fraction(256)),
    ("2 ** -2", Fraction(1, 4)),
    ("-(2) ** 2", Fraction(-4)),
    ("((((1))))", Fraction(1)),
    ("  4 - -4\t", Fraction(8)),
    ("2 ** 100", Fraction(2**100)),
    ("10 ** 49", Fraction(10**49)),
    ("9**9**9", None),  # exponent 387420489 > 100
    ("2 ** 101", None),
    ("2 ** 0.5", None),
    ("0 ** -1", None),
    ("10 ** 49 * 10", None),  # magnitude bound
    ("1 / 10 ** 50", None),
    ("1 / 0", None),
    ("3 // 2", None),
    ("3 % 2", None),
    ("1e5", None),
    ("0x10", None),
    ("1_000", None),
    ("1j", None),
    ("True", None),
    ("__import__('os').system('ls')", None),
    ("(lambda: 1)()", None),
    ("1 +", None),
    ("", None),
    ("\x00", None),
    ("1" * 201, None),  # length bound
    ("-" * 150 + "1", None),  # depth bound
    ("-" * 31 + "1", Fraction(-1)),  # nesting depth 32
    ("+".join(["1*1*1*1"] * 12), Fraction(12)),  # 95 nodes
    ("+".join(["1*1*1*1"] * 13), None),  # node bound: 103 nodes
    (NESTED, None),
]


@pytest.mark.parametrize("expression, expected", SAFE_ARITHMETIC_CASES)
def test_safe_arithmetic(expression, expected):
    assert safe_arithmetic(expression) == expected


# Fuzzing: pieces of the syntax the built-ins look for, plus arbitrary text, sometimes repeated to ~1 MB.
PIECES = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "\\frac{", "{", "}", "####", "$",
          "%", "1,234", "-", "\u2212", "/", ".", "**", "(", ")", "=", "9", "0", "x",
          "中", "Я", "𝑥", "\x00", " ", "\n", "e", "E+", "^", "^{", "\u2076", "m^2"]
fuzz_text = st.tuples(
    st.lists(st.sampled_from(PIECES) | st.text(max_size=8), max_size=30).map("".join),
    st.sampled_from([1, 1, 1, 1000, 5000]),
).map(lambda pair: pair[0] * pair[1])

BUILTINS = [
    functools.partial(accuracy_reward, answer=["42"]),
    format_reward,
    functools.partial(format_reward, strict=True),
    language_consistency_reward,
    functools.partial(language_consistency_reward, target_script="cjk"),
    length_penalty,
    functools.partial(equation_reward, numbers=[[3, 5, 2]], target=[16]),
]


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{fn} took {elapsed:.2f} s"  # a robustness bound, not a benchmark
    return result


@settings(max_examples=150)
@given(fuzz_text)
def test_builtins_never_raise_and_are_fast(completion):
    for reward in BUILTINS:
        [value] = _timed(reward, ["q"], [completion])
        assert isinstance(value, float) and -1.0 <= value <= 1.0
    value = _timed(extract_answer, completion)
    assert value is None or isinstance(value, Fraction)


@settings(max_examples=200)
@given(st.lists(st.sampled_from(list("0123456789+-*/(). ") + ["**", "9**9", "0."]), max_size=60).map("".join)
       | st.text(max_size=200))
def test_safe_arithmetic_never_raises_and_is_fast(expression):
    value = _timed(safe_arithmetic, expression)
    assert value is None or (isinstance(value, Fraction) and abs(value.numerator) < 10**50)


def _raise_on_boom(prompts, completions, **_):
    if any("boom" in c for c in completions):
        raise RuntimeError("kaboom")
    return [1.0] * len(completions)


COMPLETIONS = ["<think>6 * 7</think><answer>42</answer>", "boom <answer>42</answer>", "<answer>41</answer>"]


def test_combine_weights_and_metrics():
    reward_fn = combine([("accuracy", accuracy_reward, 1.0), ("format", format_reward, 0.5),
                         ("length", functools.partial(length_penalty, max_chars=37, ramp_chars=4), 2.0)])
    total, metrics = reward_fn(["q"] * 3, COMPLETIONS, answer=["42", "42", "42"])
    assert total.dtype == np.float32 and total.shape == (3,)
    np.testing.assert_array_equal(metrics["accuracy"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(metrics["format"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(metrics["length"], [-0.5, 0.0, 0.0])  # 39 chars: (37 - 39) / 4
    np.testing.assert_array_equal(total, [1.0 + 0.5 - 1.0, 1.0, 0.0])
    assert {k: int(v) for k, v in metrics.items() if k.startswith("errors/")} == {
        "errors/accuracy": 0, "errors/format": 0, "errors/length": 0}


def test_combine_scores_a_raising_function_zero_and_logs_it(caplog):
    reward_fn = combine([("boom", _raise_on_boom, 1.0), ("format", format_reward, 1.0)])
    with caplog.at_level(logging.WARNING, logger=rewards.__name__):
        total, metrics = reward_fn(["q"] * 3, COMPLETIONS)
    np.testing.assert_array_equal(metrics["boom"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(total, [2.0, 0.0, 1.0])
    assert int(metrics["errors/boom"]) == 1 and int(metrics["errors/format"]) == 0
    assert "reward 'boom' failed on example 1" in caplog.text and "boom <answer>42</answer>" in caplog.text


def test_combine_fatal_reraises_with_name_and_index():
    reward_fn = combine([("boom", _raise_on_boom, 1.0)], fatal=True)
    with pytest.raises(RuntimeError, match="function 'boom' failed on example 1: RuntimeError: kaboom"):
        reward_fn(["q"] * 3, COMPLETIONS)


def test_combine_handles_wrong_length_and_non_finite_output(caplog):
    def one_short(prompts, completions, **_):
        return [1.0] * (len(completions) - 1)

    def nan_on_41(prompts, completions, **_):
        return [float("nan") if "41" in c else 0.5 for c in completions]

    reward_fn = combine([("short", one_short, 1.0), ("nan", nan_on_41, 1.0)])
    with caplog.at_level(logging.WARNING, logger=rewards.__name__):
        total, metrics = reward_fn(["q"] * 3, COMPLETIONS)
    assert int(metrics["errors/short"]) == 3 and int(metrics["errors/nan"]) == 1
    np.testing.assert_array_equal(metrics["short"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(total, [0.5, 0.5, 0.0])
    assert "expected (1,), one reward per completion" in caplog.text
    assert "failed on example 2" in caplog.text and "non-finite" in caplog.text
    with pytest.raises(RuntimeError, match="'short' failed on example 0: ValueError: returned shape"):
        combine([("short", one_short, 1.0)], fatal=True)(["q"] * 3, COMPLETIONS)


def test_combine_batch_only_failure():
    def batch_of_one(prompts, completions, **_):  # ignores the batch: right only for a single completion
        return [len(completions[0]) > 20]

    total, metrics = combine([("first", batch_of_one, 1.0)])(["q"] * 3, COMPLETIONS)
    np.testing.assert_array_equal(total, [1.0, 1.0, 0.0])  # rescored one by one
    assert int(metrics["errors/first"]) == 0
    with pytest.raises(RuntimeError, match="'first' failed on the batch of 3 but on no single example"):
        combine([("first", batch_of_one, 1.0)], fatal=True)(["q"] * 3, COMPLETIONS)


def test_combine_caps_failure_logs(caplog):
    reward_fn = combine([("boom", _raise_on_boom, 1.0)])
    with caplog.at_level(logging.WARNING, logger=rewards.__name__):
        _, metrics = reward_fn(["q"] * 8, ["boom"] * 8)
    assert int(metrics["errors/boom"]) == 8
    assert caplog.text.count("failed on example") == 5 and "failed on 3 more completions" in caplog.text


def test_combine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reward name 'a' must be a non-empty string used once"):
        combine([("a", format_reward, 1.0), ("a", format_reward, 1.0)])
    with pytest.raises(ValueError, match="reward 'a': fn=3 is not callable"):
        combine([("a", 3, 1.0)])
    with pytest.raises(ValueError, match="reward 'a': weight=nan must be a finite number"):
        combine([("a", format_reward, float("nan"))])
    reward_fn = combine([("accuracy", accuracy_reward, 1.0)])
    with pytest.raises(ValueError, match="'answer' has 2 values; expected a list of 3"):
        reward_fn(["q"] * 3, COMPLETIONS, answer=["42", "42"])
    with pytest.raises(ValueError, match="'prompts' has 1 values; expected a list of 3"):
        reward_fn(["q"], COMPLETIONS, answer=["42"] * 3)
