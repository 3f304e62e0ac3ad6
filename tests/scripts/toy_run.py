"""A small GRPO run for the resume and multi-process tests: `python toy_run.py WORKDIR STEPS [options]`.

Running the same command again resumes from WORKDIR's latest checkpoint. With `--process_id I
--num_processes N --port P`, it joins a jax.distributed job on 127.0.0.1 (gloo CPU collectives).
At the end it writes WORKDIR/params_<process>.npz with every parameter, as the process sees it.
"""

import argparse
import os
import pathlib
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("steps", type=int)
parser.add_argument("--process_id", type=int, default=None)
parser.add_argument("--num_processes", type=int, default=None)
parser.add_argument("--port", type=int, default=None)
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--no_checkpoints", action="store_true")
parser.add_argument("--mesh", default="-1,1,1", help="the training mesh")
parser.add_argument("--rollout_mesh", default="", help="sampling's own mesh; empty: the training mesh")
parser.add_argument("--adam_eps", type=float, default=1e-8)
parser.add_argument("--algo", default="grpo", help="grpo, or ppo (a critic, KL in the reward)")
parser.add_argument("--lora_rank", type=int, default=0, help="LoRA adapters of this rank (0: all params)")
parser.add_argument("--pipeline", default="sync", help="config.rollout.pipeline")
parser.add_argument("--checkpoint_every", type=int, default=1)
parser.add_argument("--multi_turn", action="store_true", help="3-turn episodes of a toy environment")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax import sharding  # noqa: E402
from grpo_jax.config import GRPOConfig  # noqa: E402
from grpo_jax.models import ModelConfig, Transformer  # noqa: E402
from grpo_jax.multiturn import EpisodeSampler  # noqa: E402
from grpo_jax.tokenizers import CharTokenizer  # noqa: E402
from grpo_jax.trainer import Trainer, train  # noqa: E402

if args.num_processes:
    sharding.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

MODEL = ModelConfig(vocab_size=128 if args.multi_turn else 32, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64)
rng = np.random.default_rng(0)
dataset = [{"prompt_tokens": rng.integers(2, 32, rng.integers(2, 7)).tolist()} for _ in range(40)]


def reward_fn(examples, completions):
    rewards = np.array([np.mean(np.asarray(c) == 5) if c else 0.0 for c in completions], np.float32)
    return rewards, {"target_share": rewards}


class ToyEnv:
    """Up to 3 turns; observes the turn's length, rewards 'a's, ends when a turn has a 'b'. Each step takes
    a few milliseconds, so a kill during a rollout lands while episodes are being sampled."""

    def reset(self, example):
        self.turn = 0

    def step(self, text):
        self.turn += 1
        time.sleep(0.003)
        return f"n{len(text)}", text.count("a") / 4, "b" in text


cfg = GRPOConfig.from_dict(dict(
    sampling=dict(group_size=4, max_new_tokens=6, buckets=(8,), stop_tokens=(1,),
                  vocab_limit=101 if args.multi_turn else 0),
    env=dict(max_turns=3 if args.multi_turn else 1, max_observation_tokens=8,
             observation_template="<{observation}>"),
    rollout=dict(num_prompts=8, pipeline=args.pipeline),
    loss=dict(beta=0.04, rollout_correction="tis" if args.pipeline == "one_step_off" else "none"),
    optimizer=dict(learning_rate=1e-2, adam_eps=args.adam_eps),
    updates=dict(mu=2, num_minibatches=2), ppo=dict(kl_in_reward=args.algo == "ppo"),
    lora=dict(rank=args.lora_rank), algo=args.algo, seed=3))
mesh = sharding.make_mesh(args.mesh)
rollout_mesh = sharding.make_mesh(args.rollout_mesh) if args.rollout_mesh else None
episodes = EpisodeSampler(ToyEnv, CharTokenizer()) if args.multi_turn else None
trainer = Trainer(Transformer(MODEL, nnx.Rngs(0)), cfg, dataset, reward_fn, mesh=mesh,
                  rollout_mesh=rollout_mesh, episodes=episodes)
workdir = pathlib.Path(args.workdir)
workdir.mkdir(parents=True, exist_ok=True)
if args.no_checkpoints:
    while trainer.step < args.steps:
        print(f"step {trainer.step + 1}: reward {trainer.iteration()['reward_mean']:.3f}", flush=True)
else:
    train(trainer, workdir, args.steps, checkpoint_every=args.checkpoint_every,
          print_fn=lambda line: print(line, flush=True))
leaves = jax.tree_util.tree_leaves_with_path({"policy": trainer.state.params, "critic": trainer.state.critic})
np.savez(workdir / f"params_{jax.process_index()}.npz",
         **{jax.tree_util.keystr(path): sharding.to_host(leaf) for path, leaf in leaves})
sys.exit(0)
