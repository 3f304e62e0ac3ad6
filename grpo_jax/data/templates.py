"""Prompt templates: how an example's question becomes the text the model continues.

A template is any callable `(example, tokenizer) -> str`; it reads the question from `example["prompt"]`.

  R1_ZERO       plain text for base models: reasoning in <think> </think>, answer in <answer> </answer>,
                and the completion starts inside the <think> block (DeepSeek-R1-Zero style)
  PLAIN         the question and a newline, nothing else
  TextTemplate  any plain-text template with one `{question}` placeholder
  ChatTemplate  the tokenizer's own chat template (instruct models), with an optional system message
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping
from typing import Any

from grpo_jax.tokenizers import Tokenizer

Template = Callable[[Mapping[str, Any], Tokenizer], str]

# The answer format that R1_ZERO asks for; pass it as ChatTemplate(system=REASONING_INSTRUCTIONS) to ask an
# instruct model for the same format.
REASONING_INSTRUCTIONS = (
    "A conversation between User and Assistant. The User poses a problem and the Assistant solves it. "
    "The Assistant first works through its reasoning step by step, then states the final answer. "
    "The reasoning goes inside <think> </think> tags and the final answer inside <answer> </answer> tags, "
    "like this: <think> step-by-step reasoning </think> <answer> final answer </answer>."
)


def question_of(example: Mapping[str, Any]) -> str:
    """The question text of `example` (its "prompt" field), or a ValueError saying what an example is."""
    question = example.get("prompt") if isinstance(example, Mapping) else None
    if not isinstance(question, str):
        fields = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(
            f"example has no string 'prompt' field (got {fields}); an example is a dict "
            "{'prompt': question text, 'answer': reference answer, ...}.")
    return question


@dataclasses.dataclass(frozen=True)
class TextTemplate:
    """Plain text with one `{question}` placeholder, filled with `example["prompt"]`.

    Write literal braces as `{{` and `}}` (str.format rules).
    """

    text: str

    def __post_init__(self) -> None:
        fields = [name for _, name, _, _ in string.Formatter().parse(self.text) if name is not None]
        if fields != ["question"]:
            raise ValueError(
                f"TextTemplate text must contain the placeholder {{question}} exactly once and no other, "
                f"found {fields}; write literal braces as '{{{{' and '}}}}'.")

    def __call__(self, example: Mapping[str, Any], tokenizer: Tokenizer | None = None) -> str:
        return self.text.format(question=question_of(example))


R1_ZERO = TextTemplate(REASONING_INSTRUCTIONS + "\nUser: {question}\nAssistant: <think>")
PLAIN = TextTemplate("{question}\n")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's chat template over [system (when set), user = the question], ending with the
    assistant's generation prompt (`tokenizer.apply_chat_template(..., add_generation_prompt=True)`)."""

    system: str | None = None

    def __call__(self, example: Mapping[str, Any], tokenizer: Tokenizer) -> str:
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages.append({"role": "user", "content": question_of(example)})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
