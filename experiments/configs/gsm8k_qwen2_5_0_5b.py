r"""GRPO on GSM8K from Qwen2.5-0.5B-Instruct, for one TPU/GPU host (sizes as in DeepSeekMath's GRPO, scaled).

  python experiments/train_grpo.py --config=experiments/configs/gsm8k_qwen2_5_0_5b.py \
      --config.checkpoint=/path/to/Qwen2.5-0.5B-Instruct --workdir=/tmp/grpo_gsm8k

--config.checkpoint is a local Hugging Face directory (config.json, *.safetensors, tokenizer.json,
tokenizer_config.json); nothing is downloaded. GSM8K comes from tensorflow-datasets (prepared on first use;
--config.task_args.data_dir=... to choose where). Completions follow the DeepSeek-R1 format
<think>...</think><answer>...</answer>, asked for in the system prompt; the reward is accuracy plus a small
format reward. Multi-device: --config.mesh_shape=1,-1,1 shards params and optimizer state FSDP-style.

One chip, with bfloat16 params (--config.model.param_dtype=bfloat16; experiments/benchmarks/memory.py,
README "LoRA"; compiled on CPU, which overestimates):
  16 GiB TPU v5e: --config.updates.grad_accum_steps=16 (16-row microbatches) peaks near 11.4 GiB for full
    fine-tuning, 7.0 GiB with --config.lora.rank=16; Qwen2.5-1.5B fits only with LoRA there (15.8 GiB).
  24 GiB GPU: full fine-tuning also fits with the shipped grad_accum_steps=4 (19.0 GiB).
LoRA needed 5x the full fine-tuning learning rate on the default task (README); not measured on GSM8K.
"""

import ml_collections

from grpo_jax.config import config_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_perturbation = 0.0  # std of noise added to the initial params (robustness checks)
    config.num_steps = 500
    config.checkpoint_every = 50
    config.log_every = 1
    config.loggers = ("tensorboard",)  # and/or "wandb" (Weights & Biases; WANDB_MODE=offline works offline)
    config.sample_every = 25
    config.eval_examples = 500
    config.eval_batch_prompts = 16  # prompts per greedy decoding call of that evaluation
    config.mesh_shape = "-1,1,1"  # ("data", "fsdp", "tensor")
    config.rollout_mesh_shape = ""  # sampling's own mesh; "" samples on config.mesh_shape

    config.task = "gsm8k"
    config.task_args = ml_collections.ConfigDict({"data_dir": None})
    config.template = "chat"  # the tokenizer's chat template, with the R1 reasoning instructions as system
    config.tokenizer = ""  # "": the checkpoint directory's tokenizer
    config.max_prompt_tokens = 256
    config.rewards = (("accuracy", 1.0), ("format", 0.2))

    config.checkpoint = ""  # required: a local Hugging Face checkpoint directory of Qwen2.5-0.5B-Instruct
    # With a checkpoint, config.model overrides fields of the ModelConfig read from its config.json.
    config.model = ml_collections.ConfigDict(dict(param_dtype="float32", dtype="bfloat16", remat=True))

    config.warm_start = ml_collections.ConfigDict(dict(
        steps=0, batch_size=16, learning_rate=1e-5, ema=0.0, threshold=1.0, eval_every=100))  # instruct: none

    config.algo = "grpo"
    config.update(config_sections(
        sampling=dict(group_size=16, max_new_tokens=512, temperature=1.0, buckets=(128, 256)),
        rollout=dict(num_prompts=32),
        loss=dict(beta=0.04, kl_estimator="k3", epsilon=0.2, aggregation="seq-mean-token-mean"),
        optimizer=dict(learning_rate=1e-6, warmup_steps=10, max_grad_norm=1.0, weight_decay=0.0),
        updates=dict(mu=1, num_minibatches=2, grad_accum_steps=4),
    ))
    return config
