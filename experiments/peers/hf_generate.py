r"""Peer measurement, run in a torch environment of its own (never imported by grpo_jax): transformers
`generate` on a GGUF's weights (dequantized), the same prompts and work as grpo_jax's sampler.

  python experiments/peers/hf_generate.py --gguf=MODEL.gguf --prompts=prompts.json --group_size=8 \
      --new_tokens=128 --repeats=2

prompts.json holds a list of token-id lists. Sampling at temperature 1 with no top-k/top-p and exactly
--new_tokens tokens per row. Prints one JSON line: {"seconds": [...], "median": s, "versions": {...}}.
"""

import json
import pathlib
import statistics
import time

import common
import torch
import transformers


def main() -> None:
    parser = common.parser(new_tokens=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = pathlib.Path(args.gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, args.dtype)).eval()
    prompts = json.loads(pathlib.Path(args.prompts).read_text(encoding="utf-8"))
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("the prompts must have one length (no padding in this measurement)")
    ids = torch.tensor([p for p in prompts for _ in range(args.group_size)], dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                  eos_token_id=None)
    seconds = []
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm up
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            seconds.append(time.perf_counter() - start)
    assert out.shape == (ids.shape[0], ids.shape[1] + args.new_tokens)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"seconds": seconds, "median": statistics.median(seconds),
                      "threads": torch.get_num_threads(), "versions": versions,
                      "peak_mib": common.peak_mib()}))


if __name__ == "__main__":
    main()
