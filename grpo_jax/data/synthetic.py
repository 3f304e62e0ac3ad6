"""Synthetic verifiable tasks, generated on the fly: nothing is stored or downloaded.

Example i of a task is a pure function of (task options, split, seed, i), so a run that resumes at position i
sees the same prompts. Train and test never share a problem: a problem's split is decided by a hash of what
it is (its operands; its numbers and target), independent of the seed, and each index draws until it gets
a problem of its own split. The split is the same for every seed and every `size`, as long as
`test_fraction` is the same.

  ArithmeticTask  "What is 123 + 456?" -> "579"
  CountdownTask   "Using the numbers [3, 5, 7], create an equation that equals 22. ..." -> "22"
                  (TinyZero's Countdown; the target is always reachable)
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Sequence

from grpo_jax._validation import check_option
from grpo_jax.data.dataset import Example, check_index

SPLITS = ("train", "test")
ARITHMETIC_OPS = ("+", "-", "*", "/")
# Rejection sampling needs ~1/test_fraction draws per test example; this bound is only reached when a split
# holds (almost) no problems at all.
_MAX_DRAWS = 100_000


def split_of(key: str, test_fraction: float) -> str:
    """"test" for the share `test_fraction` of problem keys, else "train"; a stable hash, not Python's."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2**64 < test_fraction else "train"


def _check_common(split: str, size: int, test_fraction: float) -> None:
    check_option("split", split, SPLITS)
    if size < 1:
        raise ValueError(f"size={size} must be >= 1: it is the number of examples the task serves.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1); the default is 0.1.")


def _no_problem_in_split(task: object) -> ValueError:
    return ValueError(f"{task} found no problem of its split in {_MAX_DRAWS} draws; the split is (nearly) "
                      "empty: raise test_fraction (or digits / max_target) to make it larger.")


def _digit_range(digits: int) -> tuple[int, int]:
    """The smallest and largest integer of exactly `digits` digits (0-9 for one digit)."""
    return (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1


class ArithmeticTask(Sequence):
    """`size` problems "What is a <op> b?", answer the exact integer result as a string.

    Operands have exactly `digits` digits (0-9 when digits=1); with `second_digits`, b has that many. For
    "/" the divisor and the quotient have `digits` digits and the dividend is their product, so every
    division is exact. "-" may give negative answers. Fields: "prompt", "answer", "op", "operands" ([a, b]).

    Split: the unordered operand pair {a, b} decides it, whatever the operator or order, so a test pair never
    appears in train (not as b + a, nor as a * b).
    """

    def __init__(
        self,
        digits: int = 3,
        ops: Sequence[str] = ("+",),
        split: str = "train",
        second_digits: int | None = None,
        seed: int = 0,
        size: int = 10_000,
        test_fraction: float = 0.1,
    ) -> None:
        _check_common(split, size, test_fraction)
        if digits < 1:
            raise ValueError(f"digits={digits} must be >= 1.")
        if second_digits is not None and (second_digits < 1 or "/" in ops):
            raise ValueError(f"second_digits={second_digits} must be >= 1 (or None: b has `digits` digits), "
                             "and ops may not include '/' with it.")
        if not ops or any(op not in ARITHMETIC_OPS for op in ops):
            raise ValueError(f"ops={tuple(ops)} must be a non-empty subset of {ARITHMETIC_OPS}.")
        self.digits, self.ops, self.split, self.seed = digits, tuple(ops), split, seed
        self.size, self.test_fraction = size, test_fraction
        self.second_digits = second_digits
        self._low, self._high = _digit_range(digits)
        self._second = _digit_range(second_digits or digits)

    def __repr__(self) -> str:
        return (f"ArithmeticTask(digits={self.digits}, second_digits={self.second_digits}, ops={self.ops}, "
                f"split={self.split!r}, "
                f"seed={self.seed}, size={self.size}, test_fraction={self.test_fraction})")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example:
        index = check_index(index, self.size, "ArithmeticTask")
        rng = random.Random(f"arithmetic/{self.seed}/{self.split}/{index}")
        for _ in range(_MAX_DRAWS):
            op = rng.choice(self.ops)
            if op == "/":
                divisor = rng.randint(max(self._low, 1), self._high)
                result = rng.randint(self._low, self._high)  # the quotient
                a, b = divisor * result, divisor
            else:
                a, b = rng.randint(self._low, self._high), rng.randint(*self._second)
                result = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](a, b)
            if split_of(f"{min(a, b)},{max(a, b)}", self.test_fraction) == self.split:
                return {"prompt": f"What is {a} {op} {b}?", "answer": str(result), "op": op,
                        "operands": [a, b]}
        raise _no_problem_in_split(self)


def random_equation(numbers: Sequence[int], rng: random.Random) -> tuple[int, str]:
    """Combine all of `numbers`, two at a time in random order, with random operators that keep every
    intermediate value a positive integer (+, *, - when positive, / when exact).

    Returns (value, expression), e.g. (22, "(3 * 5) + 7"); eval(expression) == value.
    """
    pool = [(n, str(n)) for n in numbers]
    while len(pool) > 1:
        a, a_text = pool.pop(rng.randrange(len(pool)))
        b, b_text = pool.pop(rng.randrange(len(pool)))
        choices = [("+", a + b), ("*", a * b)]
        if a > b:
            choices.append(("-", a - b))
        if a % b == 0:
            choices.append(("/", a // b))
        op, value = rng.choice(choices)
        pool.append((value, f"({a_text} {op} {b_text})"))
    value, expression = pool[0]
    return value, expression.removeprefix("(").removesuffix(")")


class CountdownTask(Sequence):
    """TinyZero's Countdown: reach `target` from `numbers` with + - * /, using each number exactly once.

    Numbers are drawn from [1, max_number]; the target is made by combining all of them at random
    (`random_equation`) and kept when it lies in [1, max_target], so every problem has a solution.
    Fields: "prompt", "answer" (str(target)), "numbers" (list[int]), "target" (int), "solution" (one
    equation reaching the target, e.g. "(3 * 5) + 7"; other solutions may exist).

    Split: the problem (sorted numbers, target) decides it.
    """

    def __init__(
        self,
        num_numbers: int = 3,
        max_target: int = 100,
        max_number: int = 100,
        split: str = "train",
        seed: int = 0,
        size: int = 10_000,
        test_fraction: float = 0.1,
    ) -> None:
        _check_common(split, size, test_fraction)
        if num_numbers < 2:
            raise ValueError(f"num_numbers={num_numbers} must be >= 2 (TinyZero uses 3 and 4).")
        if max_target < 1 or max_number < 1:
            raise ValueError(f"max_target={max_target} and max_number={max_number} must be >= 1.")
        self.num_numbers, self.max_target, self.max_number = num_numbers, max_target, max_number
        self.split, self.seed, self.size, self.test_fraction = split, seed, size, test_fraction

    def __repr__(self) -> str:
        return (f"CountdownTask(num_numbers={self.num_numbers}, max_target={self.max_target}, "
                f"max_number={self.max_number}, split={self.split!r}, seed={self.seed}, size={self.size}, "
                f"test_fraction={self.test_fraction})")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example:
        index = check_index(index, self.size, "CountdownTask")
        rng = random.Random(f"countdown/{self.seed}/{self.split}/{index}")
        for _ in range(_MAX_DRAWS):
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            target, solution = random_equation(numbers, rng)
            if target <= self.max_target and split_of(f"{sorted(numbers)}={target}",
                                                      self.test_fraction) == self.split:
                prompt = (f"Using the numbers {numbers}, create an equation that equals {target}. "
                          "You can use +, -, * and /, and must use each number exactly once.")
                return {"prompt": prompt, "answer": str(target), "numbers": numbers, "target": target,
                        "solution": solution}
        raise _no_problem_in_split(self)
