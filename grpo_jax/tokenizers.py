"""Tokenizers: the protocol the sampler, trainer and data code rely on, and its two implementations.

  Tokenizer       the protocol: ids of eos / pad / stop tokens, encode, decode, apply_chat_template
  CharTokenizer   built-in, file-free character vocabulary (< 128 ids) for synthetic tasks
  HFTokenizer     a local Hugging Face model directory (tokenizer.json + tokenizer_config.json), rendered
                  and tokenized exactly as transformers' `apply_chat_template` does
  load_tokenizer  "char" -> CharTokenizer, a directory or a .gguf file -> HFTokenizer; nothing is ever
                  downloaded

`encode` never adds BOS/EOS: a prompt is built as text first (by a chat template or a plain prompt template,
which holds any BOS the model expects), then tokenized, as transformers' `apply_chat_template(tokenize=True)`
does with `add_special_tokens=False`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    """What grpo_jax needs from a tokenizer.

    Attributes:
      vocab_size: number of token ids (the model's embedding table may be larger, e.g. padded to 128).
      eos_id: the end-of-sequence id.
      pad_id: the id padding prompts and finished completions (may equal eos_id).
      stop_ids: ids that end a completion; contains eos_id.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens (eos, pad, ...) are dropped when `skip_special`."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `[{"role": ..., "content": ...}, ...]` as the prompt text the model was trained on."""
        ...


def _check_ids(ids: Sequence[int], vocab_size: int, owner: str) -> np.ndarray:
    """`ids` as a 1-D int64 array, or a ValueError naming the first id outside [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"ids must be a 1-D sequence of ints, got shape {arr.shape} dtype {arr.dtype}; "
            "decode one sequence at a time.")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise ValueError(
            f"token id {int(arr[bad.argmax()])} is outside the {owner} vocabulary [0, {vocab_size}); "
            "the ids were not produced by this tokenizer (or the model's vocabulary is larger than the "
            "tokenizer's: mask those logits or trim the ids).")
    return arr


# ---------------------------------------------------------------------------------------- CharTokenizer

CHAR_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
# Ids 4.. in this order. Written out (not derived from runtime state) so ids can never change.
CHAR_ALPHABET = (
    "0123456789"
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    " \n\t"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
)
CHAR_REPLACEMENT = "\ufffd"  # what <unk> decodes to
CHAR_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class CharTokenizer:
    """One id per character of a fixed printable-ASCII alphabet; needs no files.

    Ids: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, then `CHAR_ALPHABET` in order from 4: digits 0-9 (4..13),
    a-z (14..39), A-Z (40..65), space (66), newline (67), tab (68), then the 32 ASCII punctuation characters
    `!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~` (69..100). vocab_size = 101.

    Any other character encodes to `<unk>` (never an error), which decodes to U+FFFD. Special tokens are never
    parsed out of text: encode("<eos>") is five character ids, so user text cannot inject an end of sequence.

    Chat template (plain text, one "Role: content" line per message, roles system / user / assistant / tool):
      "System: {s}\\nUser: {u}\\nAssistant: {a}\\n" + ("Assistant:" if add_generation_prompt else "")
    """

    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    unk_id: int = 3
    vocab_size: int = len(CHAR_SPECIALS) + len(CHAR_ALPHABET)
    stop_ids: tuple[int, ...] = (eos_id,)

    def __init__(self) -> None:
        # Code point -> id for code points < 128; every other code point is <unk>.
        self._encode_table = np.full((128,), self.unk_id, np.int64)
        for i, char in enumerate(CHAR_ALPHABET):
            self._encode_table[ord(char)] = len(CHAR_SPECIALS) + i
        self._decode_table = (*CHAR_SPECIALS[:3], CHAR_REPLACEMENT, *CHAR_ALPHABET)
        self._skipped = frozenset((self.pad_id, self.eos_id, self.bos_id))

    def encode(self, text: str) -> list[int]:
        """One id per character of `text` (unknown characters -> `<unk>`); O(len(text)), vectorised."""
        # UTF-32 gives one 4-byte code point per character; surrogatepass keeps lone surrogates (-> <unk>).
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        ids = np.where(codepoints < 128, self._encode_table[np.minimum(codepoints, 127)], self.unk_id)
        return ids.tolist()

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Characters of `ids`; `<pad>`/`<eos>`/`<bos>` are dropped when `skip_special`, else written out.

        Raises ValueError naming the first id outside [0, vocab_size).
        """
        table = self._decode_table
        ids = _check_ids(ids, self.vocab_size, "CharTokenizer").tolist()
        if skip_special:
            return "".join(table[i] for i in ids if i not in self._skipped)
        return "".join(table[i] for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The plain "Role: content" lines of the class docstring."""
        lines = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in CHAR_ROLES:
                raise ValueError(f"messages[{i}]['role']={role!r} is not supported; use one of "
                                 f"{tuple(CHAR_ROLES)}.")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}]['content']={content!r} must be a string.")
            lines.append(f"{CHAR_ROLES[role]}: {content}\n")
        if add_generation_prompt:
            lines.append(f"{CHAR_ROLES['assistant']}:")
        return "".join(lines)


# ------------------------------------------------------------------------------------------ HFTokenizer


def _import(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"HFTokenizer needs the `{module}` package: pip install {module}") from e


def _compile_chat_template(template: str) -> Any:
    """Compile `template` in the jinja2 environment transformers uses, so renderings match byte for byte.

    Mirrors transformers' `utils/chat_template_utils._compile_jinja_template`: an immutable sandbox with
    trim_blocks / lstrip_blocks and the loopcontrols extension, a `tojson` filter that does not escape HTML,
    and the globals `raise_exception` and `strftime_now`. `{% generation %}` blocks (assistant masks in
    transformers) render their body unchanged.
    """
    import datetime

    _import("jinja2")  # a clear error when it is missing
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid jinja2 template: {e} (line {e.lineno}); fix the "
                         "template or use a plain prompt template.") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save the tokenizer.") from e


def _token_content(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, null, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _add_missing_tokens(backend: Any, added_tokens_decoder: dict[str, dict], config_file: Path) -> None:
    """Add the entries of tokenizer_config.json's `added_tokens_decoder` that tokenizer.json lacks, as
    transformers does on load; each must land on the id the config gives it."""
    tokenizers = _import("tokenizers")
    for token_id, entry in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
        content = entry["content"]
        if backend.token_to_id(content) is not None:
            continue
        options = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
        backend.add_tokens([tokenizers.AddedToken(content, special=entry.get("special", False), **options)])
        if backend.token_to_id(content) != int(token_id):
            raise ValueError(
                f"{config_file}: added_tokens_decoder[{token_id}]={content!r} is not in tokenizer.json and "
                f"would get id {backend.token_to_id(content)}, not {token_id}; re-save the tokenizer with "
                "transformers so that both files agree.")


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`) with its special tokens and chat template.

    Build one with `HFTokenizer.from_dir(path)`. encode / decode are the `tokenizers` library's, without
    adding special tokens and without transformers' optional `clean_up_tokenization_spaces` rewriting, so
    decode(encode(s), skip_special=False) == s for text the vocabulary covers. Text that spells a special
    token (e.g. "<|im_end|>") encodes to that token, as in transformers.
    """

    def __init__(
        self,
        backend: Any,
        *,
        eos_token: str,
        pad_token: str | None = None,
        bos_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`.

        Args:
          backend: the `tokenizers.Tokenizer` (e.g. `tokenizers.Tokenizer.from_file("tokenizer.json")`).
          eos_token: the end-of-sequence token string; its id is eos_id and the first of stop_ids.
          pad_token: the padding token string; None -> pad_id = eos_id.
          bos_token, unk_token: passed to the chat template (when set), as transformers does.
          chat_template: jinja2 source of the chat template; None -> apply_chat_template raises.
          extra_stop_ids: further ids that end a completion (generation_config.json's eos_token_id).
        """
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eos_id: int = self._token_id("eos_token", eos_token)
        self.pad_id: int = self.eos_id if pad_token is None else self._token_id("pad_token", pad_token)
        self.bos_id: int | None = None if bos_token is None else self._token_id("bos_token", bos_token)
        for i in extra_stop_ids:
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"extra_stop_ids contains {i}, outside the vocabulary "
                                 f"[0, {self.vocab_size}); fix eos_token_id in generation_config.json.")
        stop_ids = (self.eos_id, *(int(i) for i in extra_stop_ids))
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stop_ids))  # unique, eos first
        # transformers passes the special tokens that are set (special_tokens_map) to the template; an unset
        # one stays undefined (renders as ""), never the string "None".
        tokens = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token)
        self._template_tokens = {k: v for k, v in tokens.items() if v is not None}
        self._chat_template_source = chat_template
        self._gguf_fields: dict[str, Any] | None = None  # a GGUF tokenizer's own `tokenizer.*` metadata
        self._chat_template = None if chat_template is None else _compile_chat_template(chat_template)

    def _token_id(self, field: str, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{field}={token!r} is not a token of the tokenizer; fix {field} in "
                             "tokenizer_config.json.")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load a local model directory, as `transformers.AutoTokenizer.from_pretrained(path)` would.

        Reads `tokenizer.json` (required); `tokenizer_config.json` when present (eos/pad/bos/unk tokens,
        `chat_template`, `added_tokens_decoder` entries missing from tokenizer.json); `chat_template.jinja`
        when present (it takes precedence, as in transformers >= 4.50); and `generation_config.json`'s
        `eos_token_id` (int or list) to extend stop_ids. Without an eos_token in tokenizer_config.json, eos is
        the first eos_token_id of generation_config.json. Never downloads.
        """
        tokenizers = _import("tokenizers")
        path = Path(path).expanduser()
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: HFTokenizer needs a local directory holding the Hugging Face "
                "tokenizer.json (download the model first, e.g. `huggingface-cli download <repo>`).")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        generation_file = path / "generation_config.json"
        generation = _read_json(generation_file) if generation_file.is_file() else {}

        _add_missing_tokens(backend, config.get("added_tokens_decoder", {}), config_file)
        eos_token_ids = generation.get("eos_token_id")
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        eos_token = _token_content(config.get("eos_token"))
        if eos_token is None:
            if not eos_token_ids:
                raise ValueError(
                    f"{path} defines no eos token: neither tokenizer_config.json's eos_token nor "
                    "generation_config.json's eos_token_id is set; add \"eos_token\" to "
                    "tokenizer_config.json.")
            eos_token = backend.id_to_token(int(eos_token_ids[0]))
            if eos_token is None:
                raise ValueError(f"{generation_file}: eos_token_id={eos_token_ids[0]} is not a token id of "
                                 "tokenizer.json; fix eos_token_id.")

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]: transformers uses "default"
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        return cls(
            backend,
            eos_token=eos_token,
            pad_token=_token_content(config.get("pad_token")),
            bos_token=_token_content(config.get("bos_token")),
            unk_token=_token_content(config.get("unk_token")),
            chat_template=chat_template,
            extra_stop_ids=eos_token_ids,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        """The tokenizer a GGUF file describes in its `tokenizer.*` metadata, as llama.cpp builds it: a
        byte-level BPE (`tokenizer.ggml.model="gpt2"`) over `tokenizer.ggml.tokens` and `.merges`, split by
        the pre-tokenizer `tokenizer.ggml.pre` names (GGUF_PRE_TOKENIZERS), with control tokens (token type
        3) special and user-defined ones (4) matched whole; eos / pad / bos / unk from their `*_token_id`
        keys (an `eot_token_id` or `eom_token_id` also ends a completion); the chat template from
        `tokenizer.chat_template`. Raises ValueError naming the file and the key that is missing or
        unsupported, or a chat template that fails to render."""
        from grpo_jax.models.gguf import read_gguf  # jax-free until a GGUF is read

        tokenizers = _import("tokenizers")
        file = read_gguf(path)
        where = f"{file.path}: metadata key"
        model = file.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{where} 'tokenizer.ggml.model'={model!r}: grpo_jax reads byte-level BPE "
                             "tokenizers ('gpt2', as Llama 3, Qwen and SmolLM use); pass --config.tokenizer= "
                             "a Hugging Face directory holding the model's tokenizer.json.")
        pre = file.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{where} 'tokenizer.ggml.pre'={pre!r} is a pre-tokenizer grpo_jax does not "
                             f"know; known: {sorted(GGUF_PRE_TOKENIZERS)}. Pass --config.tokenizer= a "
                             "Hugging Face directory holding the model's tokenizer.json.")
        tokens = file.require("tokenizer.ggml.tokens", "the vocabulary")
        merges = file.require("tokenizer.ggml.merges", "the BPE merges")
        types = file.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{where} 'tokenizer.ggml.token_type' has {len(types)} entries for "
                             f"{len(tokens)} tokens; re-download the file or convert the model again.")
        split, individual_digits, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
        try:
            bpe = tokenizers.models.BPE(vocab, pairs, ignore_merges=ignore_merges)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise ValueError(f"{where}s 'tokenizer.ggml.tokens' and 'tokenizer.ggml.merges' do not form a "
                             f"BPE vocabulary ({e}); re-download the file or convert the model "
                             "again.") from None
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = _pre_tokenizer(split, individual_digits)
        backend.decoder = tokenizers.decoders.ByteLevel()
        added = [tokenizers.AddedToken(token, special=kind == 3, normalized=False)
                 for token, kind in zip(tokens, types, strict=True) if kind in (3, 4)]
        backend.add_tokens(added)

        def token(key: str) -> str | None:
            token_id = file.get(f"tokenizer.ggml.{key}")
            if token_id is None:
                return None
            if not 0 <= int(token_id) < len(tokens):
                raise ValueError(f"{where} 'tokenizer.ggml.{key}'={token_id} is outside the vocabulary "
                                 f"[0, {len(tokens)}); re-download the file or convert the model again.")
            return tokens[int(token_id)]

        eos = token("eos_token_id")
        if eos is None:
            raise ValueError(f"{where} 'tokenizer.ggml.eos_token_id' is missing: without it no completion "
                             "can end; re-download the file or convert the model again.")
        stops = [vocab[t] for t in (token("eot_token_id"), token("eom_token_id")) if t is not None]
        tokenizer = cls(backend, eos_token=eos, pad_token=token("padding_token_id"),
                        bos_token=token("bos_token_id"), unk_token=token("unknown_token_id"),
                        chat_template=file.get("tokenizer.chat_template"), extra_stop_ids=stops)
        tokenizer._gguf_fields = {key: file.get(key) for key in file.reader.fields
                                  if key.startswith("tokenizer.")}
        if tokenizer._chat_template is not None:
            try:
                tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
            except Exception as e:  # noqa: BLE001 - jinja raises many types
                raise ValueError(f"{where} 'tokenizer.chat_template' fails to render a one-message "
                                 f"conversation ({type(e).__name__}: {e}); fix the template in the file, or "
                                 "use a plain prompt template (--config.template=plain).") from None
        return tokenizer

    def gguf_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` GGUF metadata (key -> value) that describes this tokenizer: a GGUF tokenizer's
        own, or one derived from a byte-level BPE tokenizer.json whose pre-tokenizer GGUF_PRE_TOKENIZERS
        names."""
        if self._gguf_fields is not None:
            return dict(self._gguf_fields)
        state = json.loads(self._backend.to_str())
        model = state["model"]
        pre = _gguf_pre_name(self._backend.pre_tokenizer)
        if model.get("type") != "BPE" or pre is None:
            raise ValueError("this tokenizer cannot be described in GGUF metadata: grpo_jax writes "
                             "byte-level BPE tokenizers whose pre-tokenizer is one of "
                             f"{sorted(GGUF_PRE_TOKENIZERS)}.")
        tokens = [""] * self.vocab_size
        for token, i in model["vocab"].items():
            tokens[i] = token
        types = [1] * self.vocab_size
        for entry in state.get("added_tokens", []):
            tokens[entry["id"]] = entry["content"]
            types[entry["id"]] = 3 if entry.get("special") else 4
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                  "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                  "tokenizer.ggml.eos_token_id": self.eos_id, "tokenizer.ggml.padding_token_id": self.pad_id,
                  "tokenizer.ggml.add_bos_token": False}
        if self.bos_id is not None:
            fields["tokenizer.ggml.bos_token_id"] = self.bos_id
        if self._chat_template_source is not None:
            fields["tokenizer.chat_template"] = self._chat_template_source
        return fields

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (`add_special_tokens=False`)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; tokens marked special in tokenizer.json are dropped when `skip_special`.

        Raises ValueError naming the first id outside [0, vocab_size) (the `tokenizers` library would
        silently drop it).
        """
        ids = _check_ids(ids, self.vocab_size, "HFTokenizer").tolist()
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's chat template, as transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.

        Variables: `messages`, `add_generation_prompt`, `tools=None`, `documents=None` and the special tokens
        that are set (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
        """
        if self._chat_template is None:
            raise ValueError(
                "this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja), so "
                "apply_chat_template cannot render messages; use a plain prompt template instead.")
        return self._chat_template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self._template_tokens)


# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> (split regex or None for GPT-2's, digits one by
# one, ignore_merges: a word already in the vocabulary is one token), as llama.cpp's vocabulary code splits.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, False, False),
    "gpt-2": (None, False, False),
    "smollm": (None, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, False),
}


def _pre_tokenizer(split: str | None, individual_digits: bool) -> Any:
    pre_tokenizers = _import("tokenizers").pre_tokenizers
    if split is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(_import("tokenizers").Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if individual_digits:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _gguf_pre_name(pre_tokenizer: Any) -> str | None:
    """The GGUF_PRE_TOKENIZERS name whose pre-tokenizer splits as `pre_tokenizer` does, or None."""
    if pre_tokenizer is None:
        return None

    def state(p: Any) -> Any:
        value = json.loads(p.__getstate__())
        for step in [value, *value.get("pretokenizers", [])]:
            step.pop("trim_offsets", None)  # offsets only, never the ids
        return value

    own = state(pre_tokenizer)
    for name, (split, digits, _) in GGUF_PRE_TOKENIZERS.items():
        if state(_pre_tokenizer(split, digits)) == own:
            return name
    return None


def load_tokenizer(spec: str) -> Tokenizer:
    """`spec` "char" -> CharTokenizer(); a .gguf file -> HFTokenizer.from_gguf(spec); otherwise a local model
    directory -> HFTokenizer.from_dir(spec)."""
    if spec == "char":
        return CharTokenizer()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return HFTokenizer.from_gguf(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer={spec!r} is neither 'char' nor a local directory; pass 'char' or the path of a "
            "directory holding tokenizer.json (nothing is downloaded: fetch hub models first).")
    return HFTokenizer.from_dir(path)
