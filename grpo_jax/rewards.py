"""Reward functions: plain Python callables on the host, composed with weights.

A reward function scores a batch of completions:

    fn(prompts: Sequence[str], completions: Sequence[str], **example_fields) -> list[float]   # [B]

Example fields are lists aligned with `completions` (`answer=[...]`, `numbers=[...]`); every function takes
`**_` so it ignores the fields it does not use. Options are bound with `functools.partial`
(`partial(format_reward, strict=True)`), and `combine` sums several functions with weights, like a chain of
optax transforms:

    reward_fn = combine([("accuracy", accuracy_reward, 1.0), ("format", format_reward, 0.1)])
    total, metrics = reward_fn(prompts, completions, answer=answers)   # [B] float32, {name: [B], ...}

Built-ins, after the rule-based rewards of DeepSeek-R1 (arXiv 2501.12948, section 2.2.2 and 2.3.2) and
TinyZero's Countdown task: `accuracy_reward`, `format_reward`, `language_consistency_reward`,
`length_penalty` and `equation_reward`, with the helpers `extract_answer` and `safe_arithmetic`.

Completions are hostile text. Every built-in runs in (near-)linear time with non-backtracking patterns or
plain scanning, bounds its work (answers are read from the last `ANSWER_TAIL_CHARS` characters, the script
census from the first `LANGUAGE_SCAN_CHARS`), never evaluates code and never raises on a `str` completion.
Misaligned example fields or unusable references (data bugs, not model output) raise `ValueError`.
"""

from __future__ import annotations

import ast
import collections
import functools
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from fractions import Fraction
from numbers import Rational, Real
from typing import Any

import numpy as np

from grpo_jax._validation import check_option

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]
CombinedRewardFn = Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]]

ANSWER_TAIL_CHARS = 8192  # final answers are read from the end of a completion only
LANGUAGE_SCAN_CHARS = 100_000  # the script census looks at the start of the reasoning only
MAX_NUMBER_CHARS = 100  # longer numbers (digits, separators, sign) are not read as answers
MAX_DECIMAL_EXPONENT = 100  # "1e6" reads as 1000000; a larger exponent ("1e999999999") is not read

# A number: digits with optional thousands commas ("1,234"), decimals ("3.5", ".5") and a decimal exponent
# ("1e6", "2.5E-3"), an optional sign, and an optional "/denominator" ("...5" is 5, not .5). No nested
# quantifiers, so matching is linear in the text.
_NUM = r"(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|(?<![.0-9])\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER = re.compile(rf"-?{_NUM}(?:/-?{_NUM})?")
_EXPONENT = re.compile(r"[eE]([+-]?[0-9]+)")
# A power operator ("^", "**", or a superscript digit) right after a number, or right before one (with
# LaTeX braces or a bracket between): "2^6", "10^{-3}", "2**6", "10⁶". Used on short windows only.
_POWER_AFTER = re.compile(r"[\s}]*(?:\^|\*\*|[\u2070\u00b9\u00b2\u00b3\u2074-\u2079])")
_POWER_BEFORE = re.compile(r"(\^|\*\*)[\s{(]*\Z")
_POWER_WINDOW = 16  # characters looked at around a number for a power operator
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[0-9.,]+)\s*\}\{\s*(-?[0-9.,]+)\s*\}")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")


def _check_aligned(field: str, values: Sequence[Any], num_completions: int) -> None:
    sized = hasattr(values, "__len__") and not isinstance(values, (str, bytes))
    if not sized or len(values) != num_completions:
        got = f"{len(values)} values" if sized else f"a {type(values).__name__}"
        raise ValueError(f"{field!r} has {got}; expected a list of {num_completions}, one per completion "
                         "(repeat each prompt and its example once per completion of its group).")


def _last_tag_content(text: str, open_tag: str, close_tag: str) -> str | None:
    """Content of the last `open_tag ... close_tag` pair, or None."""
    end = text.rfind(close_tag)
    start = text.rfind(open_tag, 0, end) if end >= 0 else -1
    return text[start + len(open_tag):end] if start >= 0 else None


def _last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}`, braces balanced; None when absent or never closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"):i]
    return None


def _to_fraction(token: str) -> Fraction | None:
    if len(token) > MAX_NUMBER_CHARS:
        return None
    if any(abs(int(e)) > MAX_DECIMAL_EXPONENT for e in _EXPONENT.findall(token)):
        return None  # Fraction("1e999999999") would build a billion-digit integer
    numerator, _, denominator = token.replace(",", "").partition("/")
    value = Fraction(numerator)
    if denominator:
        divisor = Fraction(denominator)
        return value / divisor if divisor else None
    return value


def _last_number(text: str) -> Fraction | None:
    r"""The last number in `text`, reading `\frac{a}{b}` and "a/b" as fractions, "1,234" as 1234 and "1e6" as
    1000000.

    Currency, units and percent signs around it are ignored ("$12", "12 dollars", "12%" -> 12). A "-" right
    after a letter, digit or ")" is a minus sign of subtraction, not of the number ("5-3" -> 3). Powers are
    never evaluated: a number that is the base or exponent of a power of numbers ("2^6", "2**6", "10^{-3}",
    "(1+2)^2", "10⁶") gives None, and the exponent of a letter (a unit: "25 m^2", "5 \text{cm}^3") is skipped.
    """
    text = _LATEX_FRAC.sub(r"\1/\2", text.replace("{,}", ","))
    for match in reversed(list(_NUMBER.finditer(text))):
        start, end = match.span()
        token = match.group()
        if token.startswith("-") and start > 0 and (text[start - 1].isalnum() or text[start - 1] == ")"):
            token, start = token[1:], start + 1
        if _POWER_AFTER.match(text, end, end + _POWER_WINDOW):
            return None  # the base of a power: "2^6", "2**x"
        power = _POWER_BEFORE.search(text, max(0, start - _POWER_WINDOW), start)
        if power is None:
            return _to_fraction(token)
        base = text[max(0, power.start() - _POWER_WINDOW):power.start()].rstrip().rstrip("}").rstrip()
        if not (base and base[-1].isalpha()):
            return None  # the exponent of a number or bracket: "2^6", "(1+2)^2"
        # The exponent of a letter, a unit such as m^2: the answer is an earlier number.
    return None


def extract_answer(text: str) -> Fraction | None:
    r"""The final numeric answer of a completion or reference, as an exact fraction; None if there is none.

    Looks, in order, for the last `<answer>...</answer>` (DeepSeek-R1 template), then within it (or the whole
    text) the last `\boxed{...}` with balanced braces (MATH, Hendrycks et al. 2021), else the line after the
    last `####` (GSM8K, Cobbe et al. 2021), and reads the last number of what it found, or of the whole text
    when there is no marker. Numbers read as written: "1,000" and "1e3" are 1000, "3.50" is 7/2; a power
    ("2^6", "2**6", "10^{-3}") is never evaluated and gives None (see `_last_number`). Only the last
    `ANSWER_TAIL_CHARS` characters are read, numbers longer than `MAX_NUMBER_CHARS` characters or with a
    decimal exponent beyond `MAX_DECIMAL_EXPONENT` are not read, so the work is bounded on any input.
    """
    text = text[-ANSWER_TAIL_CHARS:].replace("\u2212", "-")  # U+2212 MINUS SIGN
    tagged = _last_tag_content(text, "<answer>", "</answer>")
    if tagged is not None:
        text = tagged
    boxed = _last_boxed(text)
    if boxed is not None:
        text = boxed
    elif (marker := text.rfind("####")) >= 0:
        text = text[marker + len("####"):].lstrip().split("\n", 1)[0]
    return _last_number(text)


def reference_value(reference: Any, index: int) -> Fraction:
    """A reference answer (number, "72", "3/4" or a GSM8K solution ending "#### 72") as an exact Fraction;
    a ValueError naming `answer[index]` when it holds no number."""
    if isinstance(reference, Rational):
        return Fraction(reference)
    if isinstance(reference, Real) and math.isfinite(reference):
        return Fraction(repr(float(reference)))  # the shortest decimal that round-trips: 0.1 -> 1/10
    value = extract_answer(reference) if isinstance(reference, str) else None
    if value is None:
        raise ValueError(f"answer[{index}]={str(reference)[:80]!r} has no numeric final answer; give a "
                         "number such as '72', '3/4' or a GSM8K solution ending in '#### 72'.")
    return value


def accuracy_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any],
                    **_: Any) -> list[float]:
    """1.0 when the completion's final answer equals the reference exactly as a number, else 0.0.

    The rule-based accuracy reward of DeepSeek-R1 (arXiv 2501.12948, section 2.2.2) for problems with a
    deterministic numeric answer. Both sides go through `extract_answer` and are compared as
    `fractions.Fraction`, so "1,234.0" == "1234", "0.75" == "3/4" == "\\frac{3}{4}", and 0.333 != 1/3.
    `answer` holds one reference per completion: a number, or text such as "72" or "... #### 72".
    """
    _check_aligned("answer", answer, len(completions))
    return [float(extract_answer(completion) == reference_value(reference, i))
            for i, (completion, reference) in enumerate(zip(completions, answer, strict=True))]


def format_reward(prompts: Sequence[str], completions: Sequence[str], strict: bool = False,
                  **_: Any) -> list[float]:
    """1.0 when the completion follows the DeepSeek-R1 template `<think>...</think><answer>...</answer>`.

    The format reward of DeepSeek-R1 (arXiv 2501.12948, section 2.2.2). `strict=True`: the whole completion
    is exactly that structure, each tag once, with nothing but whitespace around and between the two blocks.
    `strict=False`: the four tags appear in that order somewhere in the completion.
    """
    return [float(_is_strict_format(c) if strict else _is_lenient_format(c)) for c in completions]


def _is_strict_format(completion: str) -> bool:
    text = completion.strip()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return False
    if any(text.count(tag) != 1 for tag in tags):
        return False
    think_end, answer_start = text.find("</think>") + len("</think>"), text.find("<answer>")
    return think_end <= answer_start and not text[think_end:answer_start].strip()


def _is_lenient_format(completion: str) -> bool:
    position = 0
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        position = completion.find(tag, position)
        if position < 0:
            return False
        position += len(tag)
    return True


# Unicode character-name prefixes of each script's letters (e.g. "LATIN SMALL LETTER A").
SCRIPTS: dict[str, tuple[str, ...]] = {
    "latin": ("LATIN",),
    "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO"),
    "cyrillic": ("CYRILLIC",),
    "arabic": ("ARABIC",),
    "greek": ("GREEK",),
    "hebrew": ("HEBREW",),
    "devanagari": ("DEVANAGARI",),
    "thai": ("THAI",),
}


@functools.lru_cache(maxsize=65536)
def _letter_name(char: str) -> str | None:
    """The Unicode name of a letter without any width prefix; None for non-letters and math letters."""
    code = ord(char)
    if not char.isalpha() or 0x2100 <= code <= 0x214F or 0x1D400 <= code <= 0x1D7FF:  # letterlike, math
        return None
    name = unicodedata.name(char, "?")
    return name.removeprefix("FULLWIDTH ").removeprefix("HALFWIDTH ")


def language_consistency_reward(prompts: Sequence[str], completions: Sequence[str],
                                target_script: str = "latin", **_: Any) -> list[float]:
    """Share of the letters in the reasoning that belong to `target_script` (one of `SCRIPTS`).

    DeepSeek-R1 (arXiv 2501.12948, section 2.3.2) rewards the proportion of target-language words in the
    chain of thought to stop language mixing; this counts letters, which also works for scripts written
    without spaces. The reasoning is the text inside `<think>...</think>` (or before `</think>` when the
    prompt opened the tag, or the whole completion), of which the first `LANGUAGE_SCAN_CHARS` characters are
    read. Digits, punctuation, spaces, LaTeX commands (`\\frac`) and mathematical letters do not count; a
    reasoning without letters scores 1.0.
    """
    check_option("target_script", target_script, tuple(SCRIPTS))
    prefixes = SCRIPTS[target_script]
    rewards = []
    for completion in completions:
        start = completion.find("<think>")
        start = 0 if start < 0 else start + len("<think>")
        end = completion.find("</think>", start)
        reasoning = completion[start:end if end >= 0 else len(completion)][:LANGUAGE_SCAN_CHARS]
        letters = target = 0
        for char, count in collections.Counter(_LATEX_COMMAND.sub(" ", reasoning)).items():
            name = _letter_name(char)
            if name is not None:
                letters += count
                target += count if name.startswith(prefixes) else 0
        rewards.append(target / letters if letters else 1.0)
    return rewards


def overlong_penalty(lengths: Sequence[float] | np.ndarray, max_length: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to L_max - L_cache, then falling
    linearly to -1 at L_max, and -1 beyond. `lengths` in any unit (tokens for the rollout's penalty, where a
    truncated completion counts as longer than L_max; characters for `length_penalty`). Returns float32."""
    lengths = np.asarray(lengths, np.float64)
    soft_start = max_length - buffer
    penalty = np.where(lengths <= soft_start, 0.0, (soft_start - lengths) / max(buffer, 1))
    return np.where(lengths > max_length, -1.0, penalty).astype(np.float32)


def length_penalty(prompts: Sequence[str], completions: Sequence[str], max_chars: int = 4000,
                   ramp_chars: int = 1000, **_: Any) -> list[float]:
    """`overlong_penalty` in characters of the decoded text: 0 up to `max_chars` characters, then falling
    linearly to -1 at `max_chars + ramp_chars`, -1 beyond."""
    if max_chars < 0 or ramp_chars <= 0:
        raise ValueError(f"length_penalty got max_chars={max_chars}, ramp_chars={ramp_chars}; "
                         "use max_chars >= 0 and ramp_chars > 0.")
    return overlong_penalty([len(c) for c in completions], max_chars + ramp_chars, ramp_chars).tolist()


MAX_EXPRESSION_CHARS = 200
_MAX_NODES = 100
_MAX_DEPTH = 32
_MAX_EXPONENT = 100
_MAX_MAGNITUDE = 10**50  # bound on every numerator and denominator along the way
_EXPRESSION_CHARS = frozenset("0123456789.+-*/() \t")
_BINARY_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


def safe_arithmetic(expr: str) -> Fraction | None:
    """The exact value of an arithmetic expression, or None for anything else or anything too big.

    Allowed: decimal literals, `+ - * /`, unary `+ -`, parentheses, and `**` with an integer exponent of at
    most `_MAX_EXPONENT` in absolute value. The text is parsed with `ast` (never `eval`) and rejected when it
    is longer than `MAX_EXPRESSION_CHARS`, has a character other than digits, operators, brackets, spaces
    and tabs between its ends (so no names, calls or scientific notation), more than `_MAX_NODES` nodes,
    nesting deeper than `_MAX_DEPTH`, a division by zero, or any intermediate numerator or denominator of
    `_MAX_MAGNITUDE` or more.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPRESSION_CHARS:
        return None
    source = expr.strip()  # ast.parse rejects leading spaces as an indent
    if not _EXPRESSION_CHARS.issuperset(source):
        return None
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    stack, num_nodes = [(tree, 1)], 0
    while stack:
        node, depth = stack.pop()
        num_nodes += 1
        if num_nodes > _MAX_NODES or depth > _MAX_DEPTH:
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, _BINARY_OPS):
            stack += [(node.left, depth + 1), (node.right, depth + 1)]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            stack.append((node.operand, depth + 1))
        elif not (isinstance(node, ast.Constant) and type(node.value) in (int, float)):
            return None
    return _evaluate(tree, source)


def _bounded(value: Fraction | None) -> Fraction | None:
    if value is None or abs(value.numerator) >= _MAX_MAGNITUDE or value.denominator >= _MAX_MAGNITUDE:
        return None
    return value


def _evaluate(node: ast.expr, source: str) -> Fraction | None:
    """Evaluates a tree that `safe_arithmetic` has checked, bounding every intermediate value."""
    if isinstance(node, ast.Constant):
        return _bounded(Fraction(ast.get_source_segment(source, node)))  # exact decimal: "0.1" -> 1/10
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, source)
        return None if operand is None else (-operand if isinstance(node.op, ast.USub) else operand)
    left, right = _evaluate(node.left, source), _evaluate(node.right, source)
    if left is None or right is None:
        return None
    if isinstance(node.op, ast.Add):
        return _bounded(left + right)
    if isinstance(node.op, ast.Sub):
        return _bounded(left - right)
    if isinstance(node.op, ast.Mult):
        return _bounded(left * right)
    if isinstance(node.op, ast.Div):
        return _bounded(left / right) if right else None
    if right.denominator != 1 or abs(right) > _MAX_EXPONENT or (left == 0 and right < 0):
        return None
    return _bounded(left ** int(right))  # |left| < 10**50 and |exponent| <= 100: at most ~5000 digits


def equation_reward(prompts: Sequence[str], completions: Sequence[str], numbers: Sequence[Sequence[float]],
                    target: Sequence[float], **_: Any) -> list[float]:
    """1.0 when the last `<answer>` is an equation that uses each of `numbers` exactly once and equals
    `target`, else 0.0.

    TinyZero's Countdown reward (Pan et al. 2025, `countdown.py`), without its partial format score: the
    answer's left-hand side (text before any "=") is evaluated with `safe_arithmetic`, and the numbers it
    contains must be a permutation of the example's numbers. The answer is read from the last
    `ANSWER_TAIL_CHARS` characters.
    """
    _check_aligned("numbers", numbers, len(completions))
    _check_aligned("target", target, len(completions))
    rewards = []
    for completion, available, goal in zip(completions, numbers, target, strict=True):
        answer = _last_tag_content(completion[-ANSWER_TAIL_CHARS:], "<answer>", "</answer>")
        expression = None if answer is None else answer.split("=", 1)[0]
        if expression is None or len(expression) > MAX_EXPRESSION_CHARS:
            rewards.append(0.0)
            continue
        used = sorted(Fraction(token) for token in re.findall(r"[0-9]+(?:\.[0-9]+)?", expression))
        value = safe_arithmetic(expression)
        correct = value is not None and value == Fraction(goal) and used == sorted(map(Fraction, available))
        rewards.append(float(correct))
    return rewards


_MAX_LOGGED_FAILURES = 5  # per reward function and call; the rest are counted in metrics only


def _as_rewards(output: Any, size: int) -> np.ndarray:
    rewards = np.asarray(output, np.float64)
    if rewards.shape != (size,):
        raise ValueError(f"returned shape {rewards.shape}; expected ({size},), one reward per completion")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"returned non-finite rewards {rewards[~np.isfinite(rewards)][:4].tolist()}")
    return rewards


def _score(name: str, fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
           fields: dict[str, Sequence[Any]], fatal: bool) -> tuple[np.ndarray, int]:
    """One function's rewards `[B]` and its number of failed completions.

    The whole batch is scored in one call; if that call fails, each completion is scored on its own so that
    a failure costs only the completions it happens on (reward 0.0), or raises with their index if fatal.
    """
    try:
        return _as_rewards(fn(prompts, completions, **fields), len(completions)), 0
    except Exception as error:  # any failure of user code: isolate it below
        batch_error = error
        logger.warning("reward %r failed on a batch of %d (%s: %s); scoring one completion at a time.",
                       name, len(completions), type(error).__name__, _truncate(str(error)))
    rewards, failures = np.zeros(len(completions)), 0
    for i, completion in enumerate(completions):
        try:
            example = {field: [values[i]] for field, values in fields.items()}
            rewards[i] = _as_rewards(fn([prompts[i]], [completion], **example), 1)[0]
        except Exception as error:
            if fatal:
                raise RuntimeError(f"reward function {name!r} failed on example {i}: "
                                   f"{type(error).__name__}: {error}") from error
            failures += 1
            if failures <= _MAX_LOGGED_FAILURES:
                logger.warning("reward %r failed on example %d (reward 0.0): %s: %s; completion: %r", name, i,
                               type(error).__name__, _truncate(str(error)), _truncate(completion))
    if fatal:  # every example passed on its own: the batch call itself is broken
        raise RuntimeError(f"reward function {name!r} failed on the batch of {len(completions)} but on no "
                           f"single example: {type(batch_error).__name__}: {batch_error}") from batch_error
    if failures > _MAX_LOGGED_FAILURES:
        logger.warning("reward %r failed on %d more completions (reward 0.0).", name,
                       failures - _MAX_LOGGED_FAILURES)
    return rewards, failures


def _truncate(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def combine(rewards: Sequence[tuple[str, RewardFn, float]], *, fatal: bool = False) -> CombinedRewardFn:
    """Weighted sum of reward functions: `total_b = sum_k weight_k * reward_k(prompt_b, completion_b)`.

    Returns `fn(prompts, completions, **example_fields) -> (total [B] float32, metrics)`, where metrics holds
    each function's raw rewards `[B]` under its name and its number of failed completions under
    `errors/<name>`. A function that raises, returns the wrong number of rewards or non-finite ones is
    logged with the example index and a truncated copy of the completion, and gives that completion 0.0;
    with `fatal=True` the failure is raised instead, naming the function and the example index.

    Args:
      rewards: `(name, fn, weight)` triples with distinct names and finite weights.
      fatal: raise on a failing reward function instead of scoring 0.0.
    """
    names = [name for name, _, _ in rewards]
    for name, fn, weight in rewards:
        if not isinstance(name, str) or not name or names.count(name) > 1:
            raise ValueError(f"reward name {name!r} must be a non-empty string used once; got names {names}.")
        if not callable(fn):
            raise ValueError(f"reward {name!r}: fn={fn!r} is not callable; pass a function "
                             "fn(prompts, completions, **example_fields) -> list[float].")
        if not isinstance(weight, Real) or not math.isfinite(weight):
            raise ValueError(f"reward {name!r}: weight={weight!r} must be a finite number.")

    def reward_fn(prompts: Sequence[str], completions: Sequence[str],
                  **fields: Sequence[Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        _check_aligned("prompts", prompts, len(completions))
        for field, values in fields.items():
            _check_aligned(field, values, len(completions))
        total = np.zeros(len(completions))
        metrics: dict[str, np.ndarray] = {}
        for name, fn, weight in rewards:
            values, failures = _score(name, fn, prompts, completions, fields, fatal)
            total += weight * values
            metrics[name] = values.astype(np.float32)
            metrics[f"errors/{name}"] = np.asarray(failures, np.int32)
        return total.astype(np.float32), metrics

    return reward_fn
