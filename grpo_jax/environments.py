"""Environments and tools for multi-turn episodes: what the policy's turns are answered with.

  EnvConfig         `config.env`: turns per episode, observation budget, tool timeout and formats
  Environment       the protocol, one object per episode: `reset(example)`, `step(completion text)`
  ToolEnv           the environment of plain Python functions as tools: a turn that calls one gets its
                    result as the next observation; a turn without a call is the final answer, rewarded
  calculator        an exact arithmetic tool (parsed, never evaluated as code)
  parse_tool_call   the tool call in a turn's text ("json" or "pythonic" format), or None
  Observations      an observation's token ids in the chat template's turn markers, or a text template

Everything the model writes is hostile text: a tool call is parsed with `json` or `ast` (never `eval`), a
tool runs with a timeout, and a tool that raises, hangs or returns something that is not text gives an
error observation the policy reads; the run goes on. Tools are the user's code and run on the host.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple, Protocol, runtime_checkable

from grpo_jax._validation import check_fields, check_option, finite
from grpo_jax.rewards import extract_answer, reference_value, safe_arithmetic
from grpo_jax.tokenizers import Tokenizer

TOOL_FORMATS = ("json", "pythonic")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOL_CALL_CHARS = 2000  # a longer call is an error observation, not parsed
MAX_RESULT_CHARS = 2000  # a tool's result is cut to this many characters (then to the token budget)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """`config.env`: multi-turn episodes (`grpo_jax.multiturn`). max_turns=1 is single-turn sampling.

    An episode has at most `max_turns` policy turns of at most `config.sampling.max_new_tokens` tokens,
    with an observation of at most `max_observation_tokens` tokens (turn markers included) between two
    turns. Tool calls are written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` ("json",
    the Hermes/Qwen format) or `<tool_call>name(arg, key=value)</tool_call>` ("pythonic", arguments
    Python literals). `observation_template`: "chat" renders an observation as a "tool" message of the
    tokenizer's chat template followed by the assistant's generation prompt; any other text is used as it
    is with its one `{observation}` placeholder replaced (e.g. "<result>{observation}</result>\\n").
    """

    max_turns: int = 1
    max_observation_tokens: int = 64
    tool_timeout: float = 5.0  # seconds a tool may run before its call is an error observation
    tool_format: str = "json"
    observation_template: str = "chat"

    def __post_init__(self):
        check_option("config.env.tool_format", self.tool_format, TOOL_FORMATS)
        template = self.observation_template
        check_fields("config.env", [
            ("max_turns", self.max_turns, isinstance(self.max_turns, int) and self.max_turns >= 1,
             "must be an integer >= 1 (1: single-turn)"),
            ("max_observation_tokens", self.max_observation_tokens,
             isinstance(self.max_observation_tokens, int) and self.max_observation_tokens >= 1,
             "must be an integer >= 1"),
            ("tool_timeout", self.tool_timeout, finite(self.tool_timeout) and self.tool_timeout > 0,
             "must be a number of seconds > 0"),
            ("observation_template", self.observation_template,
             isinstance(template, str) and (template == "chat" or template.count("{observation}") == 1),
             "must be \"chat\" or a text with exactly one {observation} placeholder"),
        ])

    @property
    def multi_turn(self) -> bool:
        return self.max_turns > 1

    def episode_tokens(self, max_new_tokens: int) -> int:
        """The width of an episode's token sequence after its prompt: every turn and observation."""
        return self.max_turns * max_new_tokens + (self.max_turns - 1) * self.max_observation_tokens


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (a new object per episode).

    `reset(example)` starts the episode on a dataset example and returns an opening observation placed
    after the prompt (the same for every episode of the example), or None. `step(text)` receives the
    policy's turn as text and returns `(observation, reward, done)`: the observation the next turn reads
    (None when done), this turn's reward, and whether the episode ends. The episode's reward is the sum of
    its turns' rewards. An optional `metrics()` returns `{name: number}` for the episode, averaged over
    the rollout and logged as `reward/<name>`.
    """

    def reset(self, example: Mapping[str, Any]) -> str | None: ...

    def step(self, completion: str) -> tuple[str | None, float, bool]: ...


class ToolCall(NamedTuple):
    name: str
    args: tuple
    kwargs: dict


class ToolCallError(ValueError):
    """A turn tried to call a tool and the call cannot be read; its message is the observation."""


def parse_tool_call(text: str, tool_format: str = "json") -> ToolCall | None:
    """The first tool call in `text`, None when it has none; `ToolCallError` when it has a malformed one.

    "json": `<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>`.
    "pythonic": `<tool_call>calculator("2*3")</tool_call>`, arguments Python literals (read with
    `ast.literal_eval`, so no name, call or attribute of the text is ever evaluated).
    """
    check_option("tool_format", tool_format, TOOL_FORMATS)
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return None
    end = text.find(TOOL_CALL_CLOSE, start)
    if end < 0:
        raise ToolCallError(f"a tool call opened with {TOOL_CALL_OPEN} has no {TOOL_CALL_CLOSE}")
    body = text[start + len(TOOL_CALL_OPEN):end].strip()
    if len(body) > MAX_TOOL_CALL_CHARS:
        raise ToolCallError(f"a tool call of {len(body)} characters is longer than {MAX_TOOL_CALL_CHARS}")
    if tool_format == "json":
        try:
            call = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise ToolCallError(f"the tool call is not JSON ({error})") from None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ToolCallError('the tool call must be {"name": ..., "arguments": {...}}')
        arguments = call.get("arguments", {})
        if not isinstance(arguments, dict):
            raise ToolCallError("the tool call's arguments must be a JSON object")
        return ToolCall(call["name"], (), arguments)
    try:
        node = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise ToolCallError("the tool call is not name(arguments)") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ToolCallError("the tool call is not name(arguments)")
    try:
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ToolCallError("the tool call's arguments must be literals (numbers, strings, lists)") from None
    if len(kwargs) != len(node.keywords):
        raise ToolCallError("the tool call's arguments must be literals (numbers, strings, lists)")
    return ToolCall(node.func.id, args, kwargs)


def format_tool_call(name: str, arguments: Mapping[str, Any], tool_format: str = "json") -> str:
    """The text of a call in `tool_format`, as `parse_tool_call` reads it (e.g. for demonstrations)."""
    check_option("tool_format", tool_format, TOOL_FORMATS)
    if tool_format == "json":
        body = json.dumps({"name": name, "arguments": dict(arguments)})
    else:
        body = f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


@dataclasses.dataclass(frozen=True)
class Tool:
    """A Python function the policy may call: its name, and its docstring as the description."""

    fn: Callable[..., Any]
    name: str
    description: str

    @classmethod
    def of(cls, fn: Callable[..., Any] | Tool) -> Tool:
        if isinstance(fn, Tool):
            return fn
        if not callable(fn) or not getattr(fn, "__name__", "").isidentifier():
            raise ValueError(f"a tool must be a named Python function, got {fn!r}")
        try:
            inspect.signature(fn)
        except (TypeError, ValueError):
            raise ValueError(f"the tool {fn.__name__} has no readable signature (a builtin?); wrap it in a "
                             "Python function with named arguments.") from None
        return cls(fn, fn.__name__, inspect.getdoc(fn) or "")


def run_tool(tool: Tool, call: ToolCall, timeout: float) -> tuple[str, bool]:
    """Run `tool` on the call's arguments in a thread for at most `timeout` seconds: (result text, failed).

    A call whose arguments do not fit the function's signature, a tool that raises, one still running
    after `timeout` (its thread is left to finish on its own: Python cannot stop it), and one returning
    anything but text or a number give `("error: ...", True)`. The timeout cannot interrupt a tool that
    holds the interpreter lock inside one C call (e.g. a huge integer power): bound such work in the tool.
    """
    try:
        inspect.signature(tool.fn).bind(*call.args, **call.kwargs)
    except TypeError as error:
        return f"error: {tool.name}() {error}", True
    outcome: dict[str, Any] = {}

    def target():
        try:
            value = tool.fn(*call.args, **call.kwargs)
            outcome["value"] = value
            if isinstance(value, int | Fraction) and not isinstance(value, bool):
                outcome["text"] = str(value)  # here: a number too long for str() is a tool error
        except BaseException as error:  # noqa: BLE001 - the user's tool: any failure is an observation
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"error: {tool.name} timed out after {timeout:g} s", True
    if "error" in outcome:
        error = outcome["error"]
        message = f"error: {tool.name} raised {type(error).__name__}: {_safe_str(error)}"
        return message[:MAX_RESULT_CHARS], True
    value = outcome["value"]
    if isinstance(value, bool) or not isinstance(value, str | int | float | Fraction):
        return f"error: {tool.name} returned {type(value).__name__}, not text or a number", True
    if isinstance(value, float) and not math.isfinite(value):
        return f"error: {tool.name} returned {value}", True
    text = outcome.get("text", value if isinstance(value, str) else str(value))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"error: {tool.name} returned text that is not valid Unicode", True
    return text[:MAX_RESULT_CHARS], False


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - an exception whose __str__ raises
        return "(unprintable)"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: numbers, + - * / ** and parentheses.

    Args:
      expression: e.g. "1234 * 5678".

    Returns:
      the exact value as text ("7006652", "1/3"), or an error message.
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be text, got {type(expression).__name__}")
    value = safe_arithmetic(expression)
    if value is None:
        raise ValueError(f"cannot evaluate {expression[:100]!r}: use numbers, + - * / ** and parentheses")
    return str(value.numerator) if value.denominator == 1 else str(value)


TOOLS = {"calculator": calculator}


def exact_answer(example: Mapping[str, Any], text: str) -> float:
    """1.0 when the last number of `text` equals `example["answer"]` exactly (`rewards.accuracy_reward`)."""
    return float(extract_answer(text) == reference_value(example["answer"], 0))


class ToolEnv:
    """An episode where the policy may call `tools` before it answers.

    A turn with a tool call (`parse_tool_call` in `tool_format`) gets the tool's result, or an error
    message, as the next observation, reward 0. A turn without a call is the final answer: the episode
    ends with reward `answer_reward(example, text)` (default: `exact_answer`). `metrics()`: tool_calls,
    tool_errors and accuracy (`exact_answer` of the final answer when the example has an "answer", else
    its reward; 0 when the episode ran out of turns first).
    """

    def __init__(self, tools: Sequence[Callable[..., Any] | Tool], *, tool_format: str = "json",
                 timeout: float = 5.0,
                 answer_reward: Callable[[Mapping[str, Any], str], float] = exact_answer):
        self.tools = {t.name: t for t in map(Tool.of, tools)}
        check_option("tool_format", tool_format, TOOL_FORMATS)
        self.tool_format, self.timeout, self.answer_reward = tool_format, timeout, answer_reward
        self.example: Mapping[str, Any] | None = None
        self.tool_calls = self.tool_errors = 0
        self.accuracy = 0.0

    def reset(self, example: Mapping[str, Any]) -> None:
        self.example, self.tool_calls, self.tool_errors, self.accuracy = example, 0, 0, 0.0
        return None

    def step(self, completion: str) -> tuple[str | None, float, bool]:
        try:
            call = parse_tool_call(completion, self.tool_format)
        except ToolCallError as error:
            self.tool_calls += 1
            self.tool_errors += 1
            return f"error: {error}", 0.0, False
        if call is None:
            reward = float(self.answer_reward(self.example, completion))
            # accuracy is the exact answer's, whatever answer_reward weighs in (formats, several rewards)
            try:
                self.accuracy = exact_answer(self.example, completion) if "answer" in self.example else reward
            except ValueError:  # a reference without a number (a text answer): its reward is its accuracy
                self.accuracy = reward
            return None, reward, True
        self.tool_calls += 1
        tool = self.tools.get(call.name)
        if tool is None:
            self.tool_errors += 1
            return f"error: no tool {call.name[:50]!r}; the tools are {sorted(self.tools)}", 0.0, False
        result, failed = run_tool(tool, call, self.timeout)
        self.tool_errors += failed
        return result, 0.0, False

    def metrics(self) -> dict[str, float]:
        return {"tool_calls": float(self.tool_calls), "tool_errors": float(self.tool_errors),
                "accuracy": self.accuracy}


class Observations:
    """An observation's token ids, as the next turn's prompt continues: the observation inside the turn
    markers of the chat template (`"chat"`) or of a text template, after the policy's stop token, cut to
    `max_tokens` (the observation's text is shortened, the markers are kept)."""

    def __init__(self, tokenizer: Tokenizer, template: str, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        if template == "chat":
            self.before, self.after, self.stop_texts = self._chat_markers(tokenizer)
        else:
            self.before, self.after = template.split("{observation}")
            self.stop_texts = ()
        overhead = len(tokenizer.encode(self.before + self.after))
        if overhead >= max_tokens:
            raise ValueError(f"config.env.max_observation_tokens={max_tokens} leaves no room for an "
                             f"observation: the turn markers alone are {overhead} tokens "
                             f"({self.before + self.after!r}); raise it.")

    @staticmethod
    def _chat_markers(tokenizer: Tokenizer) -> tuple[str, str, tuple[str, ...]]:
        marker, probe = "\u2063ASSISTANT\u2063", "\u2063OBSERVATION\u2063"
        conversation = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(conversation + [{"role": "tool", "content": probe}],
                                                 add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a template without a tool role, or one that raises
            raise ValueError(f"config.env.observation_template='chat': the tokenizer's chat template cannot "
                             f"render a 'tool' message ({type(error).__name__}: {error}); pass a text "
                             "template instead, e.g. --config.env.observation_template="
                             "'<result>{observation}</result>\\n'") from None
        if text.count(marker) != 1 or text.count(probe) != 1 or text.index(marker) > text.index(probe):
            raise ValueError("config.env.observation_template='chat': the chat template does not render a "
                             "'tool' message after the assistant's; pass a text template instead.")
        segment = text[text.index(marker) + len(marker):]
        before, after = segment.split(probe)
        # The policy's turn already ends with its stop token: the markers start after it.
        stop_texts = tuple(tokenizer.decode([i], skip_special=False) for i in tokenizer.stop_ids)
        return before, after, tuple(s for s in stop_texts if s)

    def __call__(self, observation: str) -> list[int]:
        return self.encode(observation)[0]

    def encode(self, observation: str) -> tuple[list[int], bool]:
        """(the observation's ids, whether its text was cut to fit `max_tokens`)."""
        before = self.before
        for stop in self.stop_texts:
            if before.startswith(stop):
                before = before[len(stop):]
                break
        ids = self.tokenizer.encode(before + observation + self.after)
        if len(ids) <= self.max_tokens:
            return ids, False
        low, high = 0, len(observation)  # the longest prefix of the observation that fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            if len(self.tokenizer.encode(before + observation[:middle] + self.after)) <= self.max_tokens:
                low = middle
            else:
                high = middle - 1
        return self.tokenizer.encode(before + observation[:low] + self.after)[:self.max_tokens], True
