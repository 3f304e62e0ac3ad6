r"""Export a run's policy for other tools: a Hugging Face checkpoint with the LoRA adapters merged in
(default), a GGUF file for llama.cpp and Ollama (--format=gguf), or the adapters alone in PEFT's layout.

  python experiments/export.py --config=experiments/configs/arithmetic_tiny.py --workdir=/tmp/grpo \
      --out=/tmp/grpo-hf
  python experiments/export.py --config=... --workdir=... --out=/tmp/grpo-gguf --format=gguf --gguf_type=Q8_0
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

--format=gguf writes <out>/model.gguf: the merged policy (matrices in --gguf_type: F16, BF16, Q8_0 or F32),
its tokenizer and chat template (from a GGUF or a Hugging Face byte-level BPE tokenizer), ready for
`llama-cli -m <out>/model.gguf` or an Ollama Modelfile's FROM line.
"""

from __future__ import annotations

import pathlib
import shutil

from absl import app, flags, logging

# Importing the training script defines --config and --workdir: the export reads the same two flags.
from train_grpo import BASE_DIR, grpo_config, load_run, make_tokenizer

from grpo_jax import lora
from grpo_jax.models import WRITE_TYPES, save_gguf_checkpoint
from grpo_jax.models.gguf import tokenizer_fields as gguf_tokenizer_fields

_OUT = flags.DEFINE_string("out", None, "Directory to write the export to (new or empty).", required=True)
_ADAPTERS_ONLY = flags.DEFINE_bool(
    "adapters_only", False, "Write the LoRA adapters in PEFT's layout instead of the merged model.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "gguf"], "The merged model as a Hugging Face "
                            "directory (hf) or one GGUF file <out>/model.gguf (gguf).")
_GGUF_TYPE = flags.DEFINE_enum("gguf_type", "F16", list(WRITE_TYPES), "--format=gguf: the matrices' type.")

# Files of a Hugging Face tokenizer directory that travel with an exported model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def export(config, workdir: str | pathlib.Path, out: str | pathlib.Path, *, adapters_only: bool = False,
           file_format: str = "hf", gguf_type: str = "F16") -> dict:
    """Write the run's policy to `out` (see the module docstring); returns what was written: {"step",
    "out", "format" ("merged", "gguf" or "adapters"), "base" (the base model's path or name, adapters
    only)}."""
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out={str(out)!r} exists and is not an empty directory; pass a new directory "
                         "(an export never mixes its files with an earlier one's).")
    if file_format not in ("hf", "gguf") or gguf_type not in WRITE_TYPES:
        raise ValueError(f"--format={file_format!r} --gguf_type={gguf_type!r}: use --format=hf or gguf and "
                         f"--gguf_type of {WRITE_TYPES}.")
    if adapters_only and file_format == "gguf":
        raise ValueError("--adapters_only writes PEFT adapters, not a GGUF; drop one of --adapters_only and "
                         "--format=gguf.")
    tokenizer = make_tokenizer(config)
    grpo = grpo_config(config, tokenizer)
    if adapters_only and not grpo.lora.enabled:
        raise ValueError("--adapters_only: the run trained every weight (config.lora.rank=0), it has no "
                         "adapters; drop --adapters_only to export its model.")
    if file_format == "gguf":
        gguf_tokenizer_fields(tokenizer)  # a tokenizer GGUF cannot hold is refused before the run is read
    model, adapters, step, source = load_run(config, workdir)
    if file_format == "gguf":
        out.mkdir(parents=True, exist_ok=True)
        policy = model if adapters is None else lora.merged(model, adapters, grpo.lora)
        save_gguf_checkpoint(policy, out / "model.gguf", tokenizer, file_type=gguf_type)
        return {"step": step, "out": str(out / "model.gguf"), "format": "gguf"}
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
    result = export(flags.FLAGS.config, flags.FLAGS.workdir, _OUT.value, adapters_only=_ADAPTERS_ONLY.value,
                    file_format=_FORMAT.value, gguf_type=_GGUF_TYPE.value)
    if result["format"] == "gguf":
        print(f"wrote the policy of step {result['step']} as a {_GGUF_TYPE.value} GGUF to {result['out']}")
    elif result["format"] == "merged":
        print(f"wrote the policy of step {result['step']} as a Hugging Face checkpoint to {result['out']}")
    else:
        print(f"wrote the LoRA adapters of step {result['step']} (PEFT) to {result['out']}; base model: "
              f"{result['base']}")


if __name__ == "__main__":
    app.run(main)
