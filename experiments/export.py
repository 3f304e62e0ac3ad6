r"""Export a run's policy for other tools: a Hugging Face checkpoint with the LoRA adapters merged in
(default), or the adapters alone in PEFT's layout.

  python experiments/export.py --config=experiments/configs/arithmetic_tiny.py --workdir=/tmp/grpo \
      --out=/tmp/grpo-hf
  python experiments/export.py --config=... --workdir=... --out=/tmp/grpo-adapters --adapters_only

Pass the config the run trained with (with the same overrides; a checkpoint of another config is refused,
naming what differs). The latest checkpoint of <workdir>/checkpoints is read, as experiments/evaluate.py
reads it: only the policy's params (no optimizer state). Under LoRA (config.lora.rank > 0) it holds the
adapters alone, and the frozen base they apply to is

  * <workdir>/base, when the run saved one there (a Checkpointer checkpoint at step 0 holding
    {"params": <the base params>}: the model the run started from, warm start included), else
  * config.checkpoint (a Hugging Face directory), loaded as the run loaded it.

The default output is config.json + model.safetensors (sharded past 4 GiB) that transformers and
`grpo_jax.models.load_hf_checkpoint` load as they are: every adapted weight is W + (alpha / rank) * A @ B,
exactly the weights the run's sampler used. A full fine-tuning run (rank 0) exports its params.
--adapters_only writes adapter_model.safetensors + adapter_config.json (PEFT); when the base is not
config.checkpoint unchanged, it is written too, as a Hugging Face checkpoint in <out>/base, which
adapter_config.json names as base_model_name_or_path. The tokenizer files of a Hugging Face tokenizer
(config.tokenizer or config.checkpoint) are copied along. --out must be a new or empty directory.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
from absl import app, flags, logging
from flax import nnx

# Importing the training script defines --config and --workdir: the export reads the same two flags.
from train_grpo import grpo_config, make_model, make_tokenizer, run_fingerprint

from grpo_jax import lora, sharding
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.models import ModelConfig, Transformer, config_from_hf
from grpo_jax.trainer import check_same_run

_OUT = flags.DEFINE_string("out", None, "Directory to write the export to (new or empty).", required=True)
_ADAPTERS_ONLY = flags.DEFINE_bool(
    "adapters_only", False, "Write the LoRA adapters in PEFT's layout instead of the merged model.")

BASE_DIR = "base"  # <workdir>/base: a LoRA run's frozen base params, when config.checkpoint is not the base
# Files of a Hugging Face tokenizer directory that travel with an exported model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def model_config(config) -> ModelConfig:
    """The run's ModelConfig, read from config alone (config.checkpoint's config.json with config.model's
    overrides, or config.model), without loading or initialising any weight."""
    if config.checkpoint:
        hf_config = json.loads((pathlib.Path(config.checkpoint) / "config.json").read_text(encoding="utf-8"))
        return config_from_hf(hf_config, **config.model)
    return ModelConfig(**config.model)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_run(config, workdir: str | pathlib.Path):
    """A run's latest checkpoint as (base Transformer, adapters or None, step, base source). Under LoRA the
    base is the frozen model the adapters apply to (<workdir>/base, else config.checkpoint) and `source`
    says which ("workdir" or "checkpoint"); a full fine-tuning run's model is its trained params and the
    adapters are None. Raises FileNotFoundError when a part is missing and ValueError when the checkpoint
    is of another config."""
    workdir = pathlib.Path(workdir)
    tokenizer = make_tokenizer(config)
    grpo = grpo_config(config, tokenizer)  # the run's config, checked before anything is read
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_config(config), nnx.Rngs(0))))
    mesh = sharding.make_mesh(config.mesh_shape)
    abstract_params = _abstract(params, sharding.param_shardings(params, mesh))
    if grpo.lora.enabled:
        adapters = jax.eval_shape(lambda p: lora.init_adapters(p, grpo.lora, jax.random.key(0)), params)
        abstract = _abstract(adapters, jax.tree.map(lambda _: sharding.replicated(mesh), adapters))
    else:
        abstract = abstract_params
    directory = workdir / "checkpoints"
    if not directory.is_dir():  # Checkpointer would create the directory: only open one that exists
        raise FileNotFoundError(f"{directory} does not exist: pass the --workdir of a run (and train it).")
    with Checkpointer(directory) as checkpointer:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {directory}: train the run first.")
        try:  # the run first: a changed config would otherwise surface as mismatching arrays
            saved = checkpointer.metadata()
        except Exception:  # noqa: BLE001 - an unreadable latest step: restore falls back past it
            saved = None
        if saved is not None:
            check_same_run(saved, grpo, run_fingerprint(config), directory, partial=True)
        restored, metadata, step = checkpointer.restore({"params": abstract}, partial=True)
    check_same_run(metadata, grpo, run_fingerprint(config), directory, partial=True)
    trained = restored["params"]
    if not grpo.lora.enabled:
        return nnx.merge(graphdef, trained), None, step, "workdir"
    base_dir = workdir / BASE_DIR
    if base_dir.is_dir():
        with Checkpointer(base_dir) as checkpointer:
            if checkpointer.latest_step() is None:
                raise FileNotFoundError(f"{base_dir} holds no checkpoint of the run's base params.")
            base, _, _ = checkpointer.restore({"params": abstract_params}, partial=True)
        return nnx.merge(graphdef, base["params"]), trained, step, "workdir"
    if config.checkpoint:
        return make_model(config, tokenizer), trained, step, "checkpoint"
    raise FileNotFoundError(
        f"{base_dir} not found: a LoRA run's checkpoints hold the adapters alone, and without "
        "config.checkpoint its frozen base is saved there by experiments/train_grpo.py. Pass the run's "
        "--workdir, or the config.checkpoint it trained from.")


def export(config, workdir: str | pathlib.Path, out: str | pathlib.Path, *, adapters_only: bool = False
           ) -> dict:
    """Write the run's policy to `out` (see the module docstring); returns what was written: {"step",
    "out", "format" ("merged" or "adapters"), "base" (the base model's path or name, adapters only)}."""
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out={str(out)!r} exists and is not an empty directory; pass a new directory "
                         "(an export never mixes its files with an earlier one's).")
    grpo = grpo_config(config, make_tokenizer(config))
    if adapters_only and not grpo.lora.enabled:
        raise ValueError("--adapters_only: the run trained every weight (config.lora.rank=0), it has no "
                         "adapters; drop --adapters_only to export its model.")
    model, adapters, step, source = load_run(config, workdir)
    result = {"step": step, "out": str(out), "format": "adapters" if adapters_only else "merged"}
    if adapters_only:
        unchanged = source == "checkpoint" and not config.init_perturbation
        if unchanged:
            base_model = config.checkpoint
        else:  # the adapters are of use only with their base: it goes along as a Hugging Face checkpoint
            base_model = str((out / BASE_DIR).absolute())
            lora.export_merged(model, out / BASE_DIR)
            _copy_tokenizer(config, out / BASE_DIR)
        lora.export_adapters(adapters, grpo.lora, out, base_model=base_model)
        result["base"] = base_model
    else:
        lora.export_merged(model, out, adapters, grpo.lora if adapters is not None else None)
    _copy_tokenizer(config, out)
    return result


def _copy_tokenizer(config, out: pathlib.Path) -> None:
    source = config.tokenizer if config.tokenizer not in ("", "char") else config.checkpoint
    if not source or not pathlib.Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        if (pathlib.Path(source) / name).is_file():
            shutil.copyfile(pathlib.Path(source) / name, out / name)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
    result = export(flags.FLAGS.config, flags.FLAGS.workdir, _OUT.value, adapters_only=_ADAPTERS_ONLY.value)
    if result["format"] == "merged":
        print(f"wrote the policy of step {result['step']} as a Hugging Face checkpoint to {result['out']}")
    else:
        print(f"wrote the LoRA adapters of step {result['step']} (PEFT) to {result['out']}; base model: "
              f"{result['base']}")


if __name__ == "__main__":
    app.run(main)
