r"""Peer measurement, run in a torch environment of its own (never imported by grpo_jax): TRL's
GRPOTrainer on a GGUF's weights (dequantized), timed per optimizer step.

  python experiments/peers/trl_grpo.py --gguf=MODEL.gguf --prompts=prompts.json --group_size=8 \
      --new_tokens=64 --steps=3

prompts.json holds a list of prompt texts (already in the model's chat format). Each step: every prompt
once, G completions each of exactly --new_tokens tokens at temperature 1, a cheap reward, beta 0, one
group per gradient-accumulation microbatch, AdamW lr 1e-6, float32. Prints one JSON line:
{"step_seconds": [...], "versions": {...}}.
"""

import json
import pathlib
import tempfile
import time

import common
import datasets
import torch
import transformers
import trl


class StepTimer(transformers.TrainerCallback):
    def __init__(self):
        self.seconds, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def length_reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]  # cheap, varied within groups


def main() -> None:
    parser = common.parser(new_tokens=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = pathlib.Path(args.gguf)
    prompts = json.loads(pathlib.Path(args.prompts).read_text(encoding="utf-8"))
    dataset = datasets.Dataset.from_dict({"prompt": prompts * args.steps})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        # Dequantized into a plain model: transformers refuses to fine-tune a model it loaded from a
        # quantized file.
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                   dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        config = trl.GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, learning_rate=1e-6, beta=0.0,
            num_generations=args.group_size, per_device_train_batch_size=args.group_size,
            gradient_accumulation_steps=len(prompts), max_completion_length=args.new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, generation_kwargs={"min_new_tokens": args.new_tokens},
            max_steps=args.steps, logging_steps=1, report_to=[], save_strategy="no", shuffle_dataset=False,
            seed=0)
        trainer = trl.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=length_reward,
                                  args=config, train_dataset=dataset, callbacks=[timer])
        trainer.train()
    key = "completions/mean_length"
    lengths = [h[key] for h in trainer.state.log_history if key in h]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    print(json.dumps({"step_seconds": timer.seconds, "completion_lengths": lengths,
                      "threads": torch.get_num_threads(), "versions": versions,
                      "peak_mib": common.peak_mib()}))


if __name__ == "__main__":
    main()
