"""Examples -> the indexable dataset the Trainer reads: each example plus its rendered, tokenized prompt."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from grpo_jax.data.templates import PLAIN, Template
from grpo_jax.tokenizers import Tokenizer

# An example: {"prompt": question text, "answer": reference answer, ...task fields the rewards may read}.
Example = dict[str, Any]


def check_index(index: int, length: int, owner: str) -> int:
    """`index` as a non-negative int in [0, length); negative indices count from the end, as for lists.

    Raises IndexError when out of range (which also ends iteration over a Sequence).
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"{owner} indices must be integers, got {index!r}; read one example at a time.")
    if not -length <= index < length:
        raise IndexError(f"{owner} index {index} is out of range for length {length}.")
    return int(index) % length


class TokenizedDataset(Sequence):
    """`examples` with their prompts rendered by `template` and tokenized once, up front.

    `ds[i]` is `{**examples[i], "prompt_text": rendered prompt, "prompt_tokens": list[int]}`: the Trainer
    reads "prompt_tokens"; the reward functions receive the whole dict ("prompt", "answer", task fields).

    Every prompt is checked when the dataset is built, before any training starts: an example without a
    string "prompt", an empty prompt, or one longer than `max_prompt_tokens` raises a ValueError naming
    its index.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Tokenizer,
        template: Template = PLAIN,
        *,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """Args:
          examples: any Sequence of example dicts (a list, ArithmeticTask, CountdownTask, ...).
          tokenizer: encodes the rendered prompts (and renders them, for a ChatTemplate).
          template: `(example, tokenizer) -> prompt text`; PLAIN, R1_ZERO, ChatTemplate(...), ...
          max_prompt_tokens: when set, the longest prompt allowed, in tokens.
        """
        if len(examples) == 0:
            raise ValueError("examples is empty; a dataset needs at least one example.")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be >= 1 (or None for no limit).")
        self.examples = examples
        self.tokenizer = tokenizer
        self.template = template
        self._prompt_texts: list[str] = []
        self._prompt_tokens: list[np.ndarray] = []  # int32 arrays: a fraction of the memory of int lists
        for i in range(len(examples)):
            try:
                text = template(examples[i], tokenizer)
            except ValueError as e:
                raise ValueError(f"examples[{i}]: {e}") from e
            ids = tokenizer.encode(text)
            if not ids:
                raise ValueError(f"examples[{i}] renders to an empty prompt ({text!r}); give it a question.")
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                raise ValueError(
                    f"examples[{i}] has a {len(ids)}-token prompt, longer than max_prompt_tokens="
                    f"{max_prompt_tokens}; raise max_prompt_tokens, shorten the template or drop the example "
                    f"(prompt begins {text[:80]!r}).")
            self._prompt_texts.append(text)
            self._prompt_tokens.append(np.asarray(ids, np.int32))

    def fingerprint(self) -> str:
        """A SHA-256 digest of every example (its fields and prompt tokens), in order: the same data gives
        the same digest on any machine; a resumed run compares it with its checkpoint's."""
        digest = hashlib.sha256()
        for i in range(len(self)):
            example = {k: v for k, v in self[i].items() if k != "prompt_tokens"}
            digest.update(json.dumps(example, sort_keys=True, default=str).encode())
            digest.update(self._prompt_tokens[i].tobytes())
        return digest.hexdigest()

    @property
    def max_prompt_length(self) -> int:
        """Tokens in the longest prompt (to choose prompt buckets)."""
        return max(len(ids) for ids in self._prompt_tokens)

    def __len__(self) -> int:
        return len(self._prompt_tokens)

    def __getitem__(self, index: int) -> Example:
        index = check_index(index, len(self), "TokenizedDataset")
        return {
            **self.examples[index],
            "prompt_text": self._prompt_texts[index],
            "prompt_tokens": self._prompt_tokens[index].tolist(),
        }
