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
  * config.checkpoint (a Hugging Face directory), loaded as the run loaded it (not after a warm start,
    config.warm_start.steps > 0: that base exists only in <workdir>/base).

The default output is config.json + model.safetensors (sharded past 4 GiB) that transformers and
`grpo_jax.models.load_hf_checkpoint` load as they are: every adapted weight is W + (alpha / rank) * A @ B,
exactly the weights the run's sampler used. A full fine-tuning run (rank 0) exports its params.
--adapters_only writes adapter_model.safetensors + adapter_config.json (PEFT); when the base is not
config.checkpoint unchanged, it is written too, as a Hugging Face checkpoint in <out>/base, which
adapter_config.json names as base_model_name_or_path. The tokenizer files of a Hugging Face tokenizer
(config.tokenizer or config.checkpoint) are copied along. --out must be a new or empty directory.
"""

from __future__ import annotations

import pathlib
import shutil

from absl import app, flags, logging

# Importing the training script defines --config and --workdir: the export reads the same two flags.
from train_grpo import BASE_DIR, grpo_config, load_run, make_tokenizer

from grpo_jax import lora

_OUT = flags.DEFINE_string("out", None, "Directory to write the export to (new or empty).", required=True)
_ADAPTERS_ONLY = flags.DEFINE_bool(
    "adapters_only", False, "Write the LoRA adapters in PEFT's layout instead of the merged model.")

# Files of a Hugging Face tokenizer directory that travel with an exported model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


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
