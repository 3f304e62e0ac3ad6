r"""Countdown (TinyZero) with GRPO from a Qwen2.5 base model, for one TPU/GPU host.

  python experiments/train_grpo.py --config=experiments/configs/countdown_qwen.py \
      --config.checkpoint=/path/to/Qwen2.5-3B --workdir=/tmp/grpo_countdown

--config.checkpoint is a local Hugging Face directory of a Qwen2.5 base model (TinyZero used Qwen2.5-3B;
0.5B and 1.5B fit smaller hosts); nothing is downloaded. Problems are generated on the fly: reach the target
with + - * / using each of 3 numbers once. The R1-Zero template asks for <think>...</think> then the equation
in <answer>...</answer>; the reward is TinyZero's: 1 for a correct equation, plus a small format reward.

One chip (experiments/benchmarks/memory.py at GSM8K's batch, bfloat16 params, --config.lora.rank=16,
16-row microbatches through --config.updates.grad_accum_steps): Qwen2.5-1.5B peaks near 15.8 GiB (at the edge
of a 16 GiB TPU v5e, within a 24 GiB GPU), 7B near 65 GiB; 3B was not measured and lies between. Larger
models: shard over a host's chips (--config.mesh_shape=1,-1,1).
"""

import ml_collections

from grpo_jax.config import config_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_perturbation = 0.0  # std of noise added to the initial params (robustness checks)
    config.num_steps = 300
    config.checkpoint_every = 50
    config.log_every = 1
    config.loggers = ("tensorboard",)  # and/or "wandb" (Weights & Biases; WANDB_MODE=offline works offline)
    config.sample_every = 25
    config.eval_examples = 500
    config.eval_batch_prompts = 16  # prompts per greedy decoding call of that evaluation
    config.mesh_shape = "1,-1,1"  # FSDP: params and optimizer state sharded over all devices
    config.rollout_mesh_shape = "-1,1,1"  # sampling data-parallel with whole params: no gather per token

    config.task = "countdown"
    config.task_args = ml_collections.ConfigDict(dict(num_numbers=3, max_target=100, max_number=100,
                                                      size=100_000))
    config.template = "r1_zero"
    config.tokenizer = ""  # "": the checkpoint directory's tokenizer
    config.max_prompt_tokens = 256
    config.rewards = (("equation", 1.0), ("format", 0.1))

    config.checkpoint = ""  # required: a local Hugging Face checkpoint directory (Qwen2.5 base)
    # With a checkpoint, config.model overrides fields of the ModelConfig read from its config.json.
    config.model = ml_collections.ConfigDict(dict(param_dtype="float32", dtype="bfloat16", remat=True))

    config.warm_start = ml_collections.ConfigDict(dict(
        steps=0, batch_size=16, learning_rate=1e-5, ema=0.0, threshold=1.0, eval_every=100))  # R1-Zero: none

    config.algo = "grpo"
    config.update(config_sections(
        sampling=dict(group_size=8, max_new_tokens=512, temperature=1.0, buckets=(128, 256)),
        rollout=dict(num_prompts=32),
        loss=dict(beta=0.001, kl_estimator="k3", epsilon=0.2, aggregation="seq-mean-token-mean"),
        optimizer=dict(learning_rate=1e-6, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0),
        updates=dict(mu=1, num_minibatches=2, grad_accum_steps=2),
    ))
    return config
