"""Multi-turn GRPO with a tool: 4-digit multiplication with a calculator, on the default tiny model, on CPU.

  python experiments/train_grpo.py --config=experiments/configs/calculator_tiny.py --workdir=/tmp/calc
  python experiments/train_grpo.py --config=experiments/configs/calculator_tiny.py --workdir=/tmp/calc0 \\
      --config.tools="()" --config.env.max_turns=1 --config.warm_start.tool_fraction=0   # without the tool

A 0.4M-parameter character model cannot multiply 4-digit numbers in its head. Each episode has up to two
turns: the policy answers, or writes <tool_call>calculator(expression='1234*5678')</tool_call>, reads the
result as <result>7006652</result>, and answers in its second turn. The warm start demonstrates the call on
a share of the problems (config.warm_start.tool_fraction) and the bare answer on the others, so GRPO starts
from a policy that calls the tool on some problems; it learns to call it on all of them. The held-out
accuracy and tool-call rate are evaluated every config.eval_every steps (eval/greedy_accuracy,
eval/tool_call_rate in metrics.jsonl and plots.png).
"""

import ml_collections

from grpo_jax.config import config_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_perturbation = 0.0
    config.num_steps = 100
    config.checkpoint_every = 20
    config.log_every = 1
    config.loggers = ("tensorboard",)
    config.sample_every = 20
    config.eval_examples = 200
    config.eval_every = 10
    config.eval_batch_prompts = 200
    config.mesh_shape = "-1,1,1"
    config.rollout_mesh_shape = ""

    config.task = "arithmetic"
    config.task_args = ml_collections.ConfigDict({"digits": 4, "ops": ("*",), "size": 20_000})
    config.template = "plain"
    config.tokenizer = "char"
    config.max_prompt_tokens = 32
    config.rewards = (("accuracy", 1.0),)  # of the final answer
    config.tools = ("calculator",)

    config.checkpoint = ""
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True))

    # Demonstrations: the calculator call on tool_fraction of the problems, the bare answer on the rest.
    config.warm_start = ml_collections.ConfigDict(dict(
        steps=1500, batch_size=64, learning_rate=1e-3, ema=0.99, threshold=0.15, eval_every=50,
        tool_fraction=0.3))

    config.algo = "grpo"
    config.update(config_sections(
        sampling=dict(group_size=8, max_new_tokens=64, temperature=1.0, buckets=(32,)),
        rollout=dict(num_prompts=16),
        loss=dict(epsilon=0.2, epsilon_high=0.28, aggregation="token-mean", beta=0.0),
        # At 6e-4 without warmup (the default task's rate) 2 of 3 runs collapsed within 5 steps: the
        # first rollouts hold ~1 right answer in 128 episodes, and Adam's first steps are full-size on that
        # noise (tool-call errors rose from 4% to 77% of episodes, then no group had signal). 2e-4 after 10
        # warmup steps learned on those seeds (README, "Multi-turn episodes").
        optimizer=dict(learning_rate=2e-4, schedule="cosine", warmup_steps=10, max_grad_norm=1.0),
        updates=dict(grad_accum_steps=2),
        env=dict(max_turns=2, max_observation_tokens=32, tool_format="pythonic",
                 observation_template="<result>{observation}</result>\n"),
    ))
    return config
