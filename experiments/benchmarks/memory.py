r"""Device memory of GRPO on Qwen2.5 shapes, full fine-tuning against LoRA and QLoRA, all abstract.

  python experiments/benchmarks/memory.py
  python experiments/benchmarks/memory.py --models=0.5B --microbatches=16

Qwen2.5-0.5B / 1.5B / 7B shapes (--models), full fine-tuning against LoRA (--lora_rank, every projection
targeted) and QLoRA (int8 base): bytes held between steps (weights, adapters, optimizer state, reference
copy at beta > 0), the LoRA / full trainable-state ratio, and XLA's compiled peak of one train step at the
gsm8k config's minibatch (experiments/configs/gsm8k_qwen2_5_0_5b.py; --prompt_tokens, --new_tokens change
its lengths), with bfloat16 params (--param_dtype) and the config's bfloat16 compute and remat, against a
16 GiB and a 24 GiB device: `profiling.memory_report`. Everything is abstract (jax.eval_shape,
ShapeDtypeStruct): no weight is allocated or read, the step is compiled for this backend and never run. The
step is compiled at 2 and 3 layers and extrapolated to the model's depth (--full_depth compiles it whole).
On a CPU the peak approximates an accelerator's: XLA's CPU backend fuses less (e.g. the attention softmax)
and never rematerializes to fit a memory limit, as the GPU and TPU compilers do.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import jax
from absl import app, flags

from grpo_jax import experiment
from grpo_jax.config import SECTIONS, GRPOConfig
from grpo_jax.models import ModelConfig
from grpo_jax.profiling import memory_report

# Qwen2.5's shapes, from each checkpoint's config.json (only shapes matter here: no weight is made or read).
QWEN2_5 = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
               num_kv_heads=4, tie_word_embeddings=False),
}
GIB = 2**30
CHIPS = {"16 GiB (TPU v5e)": 16 * GIB, "24 GiB (GPU)": 24 * GIB}
# XLA's CPU scheduler by default orders the program for parallelism, keeping buffers alive that an
# accelerator's memory-aware scheduler frees (remat then saves nothing); the bench compiles with the
# memory-minimising schedule instead, so a CPU compile approximates a TPU/GPU one.
CPU_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
GSM8K_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "gsm8k_qwen2_5_0_5b.py"

_MODELS = flags.DEFINE_list("models", ["0.5B", "1.5B", "7B"], "Qwen2.5 sizes, of 0.5B, 1.5B, 7B.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 16, "LoRA rank compared with full fine-tuning.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"],
                                 "Storage dtype of the model's params (the adapters are float32).")
_MICROBATCHES = flags.DEFINE_integer(
    "microbatches", 0, "Microbatches per update (grad_accum_steps; 0: the gsm8k config's). Smaller "
    "microbatches, the same update: the activations and attention scores shrink with them.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 0, "Prompt length P (0: the gsm8k config's).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 0, "Completion length T (0: the gsm8k config's).")
_FULL_DEPTH = flags.DEFINE_bool(
    "full_depth", False, "Compile the train step at the model's whole depth instead of at 2 and 3 layers "
    "extrapolated (minutes per compile; on a CPU, XLA's scheduler may then run every layer's "
    "recomputation ahead of the backward pass, which inflates the peak).")


def qwen2_5_config(size: str, *, param_dtype: str = "bfloat16", dtype: str = "bfloat16",
                   remat: bool = True) -> ModelConfig:
    """The ModelConfig of Qwen2.5-`size` (0.5B, 1.5B, 7B): qkv bias, RoPE theta 1e6, head_dim = D / heads."""
    return ModelConfig(**QWEN2_5[size], qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, param_dtype=param_dtype, dtype=dtype, remat=remat)


def gsm8k_setup(lora_rank: int = 0, quantize: str = "", microbatches: int = 0) -> tuple[GRPOConfig, int]:
    """The GRPOConfig of experiments/configs/gsm8k_qwen2_5_0_5b.py (config.lora.rank = `lora_rank`,
    config.lora.quantize = `quantize`, grad_accum_steps = `microbatches` unless 0) and its prompt length:
    min(max_prompt_tokens, the largest bucket). The tokenizer's fields keep their defaults (vocab_limit 0:
    the whole vocabulary)."""
    config = experiment.load_config(GSM8K_CONFIG)
    sections = {name: config[name].to_dict() for name in SECTIONS}
    sections["lora"]["rank"] = lora_rank
    sections["lora"]["quantize"] = quantize
    if microbatches:
        sections["updates"]["grad_accum_steps"] = microbatches
    grpo = GRPOConfig.from_dict({**sections, "algo": config.algo, "num_steps": config.num_steps,
                                 "seed": config.seed})
    return grpo, min(config.max_prompt_tokens, max(grpo.sampling.buckets))


def size(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n else "0"


def main(argv) -> None:
    del argv
    # Before the backend starts: see CPU_MEMORY_FLAG.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_MEMORY_FLAG}".strip()
    rank, microbatches = _LORA_RANK.value, _MICROBATCHES.value
    full_cfg, prompt_tokens = gsm8k_setup(0, microbatches=microbatches)
    lora_cfg, _ = gsm8k_setup(rank, microbatches=microbatches)
    qlora_cfg, _ = gsm8k_setup(rank, "int8", microbatches=microbatches)
    if _NEW_TOKENS.value:
        full_cfg, lora_cfg, qlora_cfg = (dataclasses.replace(c, sampling=dataclasses.replace(
            c.sampling, max_new_tokens=_NEW_TOKENS.value)) for c in (full_cfg, lora_cfg, qlora_cfg))
    prompt_tokens = _PROMPT_TOKENS.value or prompt_tokens
    depths = None if _FULL_DEPTH.value else (2, 3)
    s, u = full_cfg.sampling, full_cfg.updates
    print(f"memory: GRPO device memory, full fine-tuning vs LoRA (and QLoRA) rank {rank} (alpha "
          f"{lora_cfg.lora.alpha:g}, targets {','.join(lora_cfg.lora.targets)}); AdamW, beta="
          f"{full_cfg.loss.beta:g}; {_PARAM_DTYPE.value} params (the LoRA adapters too), bfloat16 compute, "
          f"remat.\nOne train step of the gsm8k config: {full_cfg.rollout.num_prompts // u.num_minibatches} "
          f"prompts x G={s.group_size}, {prompt_tokens} prompt + {s.max_new_tokens} new tokens, in "
          f"{u.grad_accum_steps} microbatches; compiled for {jax.default_backend()} on abstract shapes "
          "(nothing allocated or run), " + ("at the whole depth." if depths is None else
                                            "at 2 and 3 layers, extrapolated linearly to the model's depth.")
          + " GiB = 2^30 bytes.")
    total = time.perf_counter()
    for model in _MODELS.value:
        model_cfg = qwen2_5_config(model, param_dtype=_PARAM_DTYPE.value)
        reports = [memory_report(model_cfg, c, prompt_tokens, depths=depths)
                   for c in (full_cfg, lora_cfg, qlora_cfg)]
        full, lora, qlora = reports
        print(f"\nQwen2.5-{model} ({full['params'] / 1e9:.2f}B params, {model_cfg.num_layers} layers), "
              f"microbatch {full['microbatch_rows']} rows:")
        print(f"  {'':42s} {'full FT':>11s} {f'LoRA r={rank}':>11s} {'QLoRA int8':>11s}")

        def row(name, *values):
            print(f"  {name:42s} " + " ".join(f"{v:>11s}" for v in values))

        def step(report, part):
            return "n/a" if report["step"] is None else size(report["step"][part])

        row("policy weights (LoRA: the frozen base)", *(size(r["weights"]) for r in reports))
        row("LoRA adapters", "-", size(lora["adapters"]), size(qlora["adapters"]))
        row("optimizer state (AdamW moments)", *(size(r["optimizer"]) for r in reports))
        row(f"reference params (beta={full_cfg.loss.beta:g})", *(size(r["reference"]) for r in reports))
        row("held between steps", *(size(r["held"]) for r in reports))
        row("trainable state (trained params + moments)", *(size(r["trainable"]) for r in reports))
        for part in ("arguments", "outputs", "temporaries", "aliased"):
            row(f"  train step {part}", *(step(r, part) for r in reports))
        row("train step peak (compiled)", *(step(r, "peak") for r in reports))
        row("peak + reference", *("n/a" if r["need"] is None else size(r["need"]) for r in reports))
        for chip, capacity in CHIPS.items():
            row(f"fits {chip}", *("n/a" if r["need"] is None else "yes" if r["need"] <= capacity else "no"
                                  for r in reports))
        row("compile time", *(f"{r['compile_seconds']:.1f} s" for r in reports))
        for name, r in zip(("full FT", "LoRA", "QLoRA"), reports, strict=True):
            if r["step_error"]:
                print(f"  {name}: the train step does not compile: {r['step_error'][:300]}")
        print(f"  LoRA trainable state / full fine-tuning's: {lora['trainable'] / full['trainable']:.2%} of "
              f"the bytes (target <= 2%), {lora['trainable_params'] / full['trainable_params']:.2%} of the "
              f"parameters ({lora['trainable_params'] / 1e6:.1f}M)")
    print("\nfits: peak + reference <= the chip's memory, with no allowance for the runtime's own "
          "reservation or the sampler's KV cache. QLoRA: the frozen targeted kernels as int8 with a "
          "scale per column, dequantized inside the step. "
          f"Total {time.perf_counter() - total:.0f} s.")


if __name__ == "__main__":
    app.run(main)
