"""Tokenizers: pinned CharTokenizer ids and round trips; HFTokenizer against transformers' own outputs.

The expected HF values (ids, chat rendering) were produced by transformers in
tests/fixtures/make_hf_fixtures.py; these tests need neither transformers, torch nor a network.
"""

import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpo_jax.tokenizers import (
    CHAR_ALPHABET,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "hf" / "tokenizer"
EXPECTED = json.loads((FIXTURE_DIR / "expected.json").read_text())
CHAT = EXPECTED["chat"]

# ------------------------------------------------------------------------------------------ CharTokenizer

CHAR = CharTokenizer()

ROUND_TRIP = [
    "",
    "12+7=19",
    "What is 38 * 4 - (12 / 3)?",
    "Compute: 3^2 % 5 < 10 >= 2 != 1",
    "<think>\n6 * 7 = 42, so the answer is 42.\n</think>\n<answer>42</answer>",
    "He said \"yes\"; she said 'no'! #tag_1 @user [a]{b}|c\\d`e~f&g$h",
    "Tab\tseparated\tvalues\nand  double  spaces ",
    "<eos><pad><bos><unk>",  # spelled out, these are characters, never special tokens
]


def test_char_pinned_ids():
    assert (CHAR.pad_id, CHAR.eos_id, CHAR.bos_id, CHAR.unk_id) == (0, 1, 2, 3)
    assert CHAR.stop_ids == (1,)
    assert CHAR.vocab_size == 101
    pinned = {"0": 4, "9": 13, "a": 14, "z": 39, "A": 40, "Z": 65, " ": 66, "\n": 67, "\t": 68, "!": 69,
              "+": 79, "-": 81, "=": 87, "~": 100}
    for char, token_id in pinned.items():
        assert CHAR.encode(char) == [token_id], char
    assert CHAR.encode("12+7=19") == [5, 6, 79, 11, 87, 5, 13]


def test_char_alphabet_is_printable_ascii():
    assert len(set(CHAR_ALPHABET)) == len(CHAR_ALPHABET) == 97
    assert set(CHAR_ALPHABET) == set(string.digits + string.ascii_letters + string.punctuation + " \n\t")
    assert CharTokenizer().encode(CHAR_ALPHABET) == list(range(4, 101))  # a fresh instance: same table


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_char_round_trip(text):
    ids = CHAR.encode(text)
    assert len(ids) == len(text)
    assert all(4 <= i < CHAR.vocab_size for i in ids)
    assert CHAR.decode(ids) == text
    assert CHAR.decode(np.asarray(ids, np.int32), skip_special=False) == text


def test_char_unknown_characters_map_to_unk():
    text = "héllo ∑ 😀\x00\ud800"  # accents, math, emoji, NUL, a lone surrogate
    ids = CHAR.encode(text)
    assert ids == [21, 3, 25, 25, 28, 66, 3, 66, 3, 3, 3]
    assert CHAR.decode(ids) == "h\ufffdllo \ufffd \ufffd\ufffd\ufffd"
    assert CHAR.decode(ids, skip_special=False) == CHAR.decode(ids)


def test_char_decode_special_tokens():
    ids = [2, *CHAR.encode("42"), 1, 0, 0]
    assert CHAR.decode(ids) == "42"
    assert CHAR.decode(ids, skip_special=False) == "<bos>42<eos><pad><pad>"


@pytest.mark.parametrize("bad", [101, -1, 1000])
def test_char_decode_out_of_vocabulary_raises(bad):
    match = rf"token id {bad} is outside the CharTokenizer vocabulary \[0, 101\)"
    with pytest.raises(ValueError, match=match):
        CHAR.decode([4, bad, 5])


def test_char_decode_rejects_non_int_ids():
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        CHAR.decode([[4, 5]])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        CHAR.decode([4.0])
    assert CHAR.decode([]) == ""


def test_char_encode_long_string():
    text = "<answer>12345</answer>\n" * 50_000  # 1.15M characters: one vectorised lookup
    ids = CHAR.encode(text)
    assert len(ids) == len(text)
    assert ids[:8] == [86, 14, 27, 32, 36, 18, 31, 88]
    assert CHAR.decode(ids) == text


def test_char_chat_template():
    messages = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "3+4=?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "5*6=?"},
    ]
    expected = "System: Answer with a number.\nUser: 3+4=?\nAssistant: 7\nUser: 5*6=?\n"
    assert CHAR.apply_chat_template(messages) == expected + "Assistant:"
    assert CHAR.apply_chat_template(messages, add_generation_prompt=False) == expected


def test_char_chat_template_errors():
    with pytest.raises(ValueError, match=r"messages\[1\]\['role'\]='function' is not supported"):
        CHAR.apply_chat_template([{"role": "user", "content": "a"}, {"role": "function", "content": "b"}])
    # "tool" is a role: a multi-turn episode's observations are tool messages
    assert CHAR.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
                                    add_generation_prompt=False) == "User: a\nTool: b\n"
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]=None must be a string"):
        CHAR.apply_chat_template([{"role": "user"}])


@given(st.text())
def test_char_encode_never_raises(text):
    ids = CHAR.encode(text)
    assert len(ids) == len(text)
    expected = [3 if c not in CHAR_ALPHABET else 4 + CHAR_ALPHABET.index(c) for c in text]
    assert ids == expected


@given(st.text(alphabet=CHAR_ALPHABET))
def test_char_round_trip_fuzz(text):
    assert CHAR.decode(CHAR.encode(text)) == text


def test_char_load_and_protocol():
    tok = load_tokenizer("char")
    assert isinstance(tok, CharTokenizer)
    assert isinstance(tok, Tokenizer)


# ------------------------------------------------------------------------------------------- HFTokenizer


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("tokenizers")
    return HFTokenizer.from_dir(FIXTURE_DIR)


def make_dir(tmp_path, config=None, generation=None, template=None) -> Path:
    """A model directory with the fixture's tokenizer.json and the given optional files."""
    pytest.importorskip("tokenizers")
    shutil.copy(FIXTURE_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    return tmp_path


def test_hf_special_tokens(hf):
    specials = EXPECTED["special_tokens"]
    assert hf.vocab_size == EXPECTED["vocab_size"] == 118
    assert hf.eos_id == specials[EXPECTED["eos_token"]] == 2
    assert hf.pad_id == specials[EXPECTED["pad_token"]] == 0
    assert hf.bos_id is None
    assert hf.stop_ids == (2,)
    assert isinstance(hf, Tokenizer)
    assert isinstance(load_tokenizer(str(FIXTURE_DIR)), HFTokenizer)


@pytest.mark.parametrize("example", EXPECTED["examples"], ids=lambda e: e["text"][:16])
def test_hf_encode_matches_transformers(hf, example):
    assert hf.encode(example["text"]) == example["ids"]


@pytest.mark.parametrize("example", EXPECTED["examples"], ids=lambda e: e["text"][:16])
def test_hf_decode_round_trip(hf, example):
    text = hf.decode(example["ids"], skip_special=False)
    assert text == "".join(example["tokens"])
    if "~" not in example["text"]:  # the one character outside the fixture's vocabulary
        assert text == example["text"]


def test_hf_decode_unknown_and_special(hf):
    assert hf.decode(hf.encode("Zebra ~ unknown")) == "Zebra <unk> unknown"  # <unk> is not special here
    assert hf.decode(CHAT["rendered_ids"]) == CHAT["rendered"].replace("<|im_start|>", "").replace(
        "<|im_end|>", "")
    with pytest.raises(ValueError, match=r"token id 118 is outside the HFTokenizer vocabulary \[0, 118\)"):
        hf.decode([83, 118])


def test_hf_chat_template_matches_transformers(hf):
    rendered = hf.apply_chat_template(CHAT["messages"], add_generation_prompt=CHAT["add_generation_prompt"])
    assert rendered == CHAT["rendered"]
    assert hf.encode(rendered) == CHAT["rendered_ids"]
    without = hf.apply_chat_template(CHAT["messages"], add_generation_prompt=False)
    assert without + "<|im_start|>assistant\n" == CHAT["rendered"]


def test_hf_missing_files(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        HFTokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither 'char' nor a local directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id is not fetched


def test_hf_without_tokenizer_config(tmp_path):
    make_dir(tmp_path)
    with pytest.raises(ValueError, match="defines no eos token.*add \"eos_token\" to tokenizer_config.json"):
        HFTokenizer.from_dir(tmp_path)

    make_dir(tmp_path, generation={"eos_token_id": [2, 0]})
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.eos_id == 2
    assert tok.pad_id == 2  # no pad token: pad falls back to eos
    assert tok.stop_ids == (2, 0)
    assert tok.encode("hello world") == [83, 66, 87]
    with pytest.raises(ValueError, match="no chat_template.*use a plain prompt template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_config_variants(tmp_path):
    config = {
        "eos_token": {"content": "<|im_end|>", "__type": "AddedToken"},  # older AddedToken form
        "bos_token": "<|im_start|>",
        "chat_template": "ignored: chat_template.jinja takes precedence",
    }
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ messages[0]['content'] | tojson }}"
    make_dir(tmp_path, config=config, generation={"eos_token_id": 0}, template=template)
    tok = HFTokenizer.from_dir(tmp_path)
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.stop_ids) == (2, 2, 1, (2, 0))
    rendered = tok.apply_chat_template([{"role": "user", "content": "a<b>&\"é"}])
    assert rendered == '<|im_start|>|<|im_end|>||"a<b>&\\"é"'  # unset pad_token renders "", tojson keeps <>&é


def test_hf_bad_special_token(tmp_path):
    make_dir(tmp_path, config={"eos_token": "</s>"})
    with pytest.raises(ValueError, match=r"eos_token='</s>' is not a token of the tokenizer"):
        HFTokenizer.from_dir(tmp_path)
    make_dir(tmp_path, config={"eos_token": "<|im_end|>"}, generation={"eos_token_id": [2, 500]})
    with pytest.raises(ValueError, match=r"extra_stop_ids contains 500.*generation_config.json"):
        HFTokenizer.from_dir(tmp_path)


def test_hf_added_tokens_decoder(tmp_path):
    added = {
        "2": {"content": "<|im_end|>", "special": True},  # already in tokenizer.json
        "118": {"content": "<think>", "special": True, "normalized": False},
        "119": {"content": "</think>", "special": False, "normalized": False},
    }
    make_dir(tmp_path, config={"eos_token": "<|im_end|>", "added_tokens_decoder": added})
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 120
    ids = tok.encode("<think>hello</think>")
    assert ids == [118, 83, 119]
    assert tok.decode(ids) == "hello</think>"  # only special tokens are skipped
    assert tok.decode(ids, skip_special=False) == "<think>hello</think>"

    make_dir(tmp_path, config={"eos_token": "<|im_end|>", "added_tokens_decoder": {"200": added["118"]}})
    with pytest.raises(ValueError, match=r"added_tokens_decoder\[200\]='<think>'.*would get id 118"):
        HFTokenizer.from_dir(tmp_path)


def test_hf_template_environment(tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {% generation %}[{{ m['content'] }}]{% endgeneration %}\n"
        "{% endfor %}{% if tools is none %}no tools{% endif %}"
    )
    make_dir(tmp_path, config={"eos_token": "<|im_end|>", "chat_template": template})
    tok = HFTokenizer.from_dir(tmp_path)
    messages = [{"role": "user", "content": c} for c in "abc"]
    # trim_blocks / lstrip_blocks remove the newline and indentation around block tags; break ends the loop.
    assert tok.apply_chat_template(messages) == "[a][b]no tools"
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])

    make_dir(tmp_path, config={"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}"})
    with pytest.raises(ValueError, match="chat_template is not a valid jinja2 template"):
        HFTokenizer.from_dir(tmp_path)
