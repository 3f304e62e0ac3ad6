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

from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax import experiment
from grpo_jax.models import WRITE_TYPES

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file (and its overrides).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/grpo_jax/jax", "JAX's persistent compilation cache (train_grpo.py's): "
    "programs the run compiled load from there; \"\" turns it off.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the export to (new or empty).", required=True)
_ADAPTERS_ONLY = flags.DEFINE_bool(
    "adapters_only", False, "Write the LoRA adapters in PEFT's layout instead of the merged model.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "gguf"], "The merged model as a Hugging Face "
                            "directory (hf) or one GGUF file <out>/model.gguf (gguf).")
_GGUF_TYPE = flags.DEFINE_enum("gguf_type", "F16", list(WRITE_TYPES), "--format=gguf: the matrices' type.")

def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
    if _CACHE.value:
        experiment.use_compilation_cache(pathlib.Path(_CACHE.value).expanduser())
    result = experiment.export(_CONFIG.value, _WORKDIR.value, _OUT.value, adapters_only=_ADAPTERS_ONLY.value,
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
