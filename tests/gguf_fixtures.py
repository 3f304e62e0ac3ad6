"""Tiny GGUF models for the tests: a random llama / qwen2 / qwen3 model and a byte-level BPE tokenizer's
GGUF metadata, written with grpo_jax's own GGUF writer."""

import jax
from flax import nnx

from grpo_jax.models import ModelConfig, Transformer, save_gguf_checkpoint

VOCAB = 96  # the tiny tokenizer's: 2 special tokens, 92 printable byte-level characters and 2 merges
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class TinyTokenizer:
    """Just the `tokenizer.*` metadata of a byte-level BPE over printable ASCII with 2 merges."""

    def __init__(self, **changes):
        tokens = ["<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(33, 127)]
        tokens[-4:] = ["Ċ", "Ġ", "Ġt", "he"]  # the last four characters give way to newline, space, 2 merges
        self.fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                       "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3] + [1] * 94,
                       "tokenizer.ggml.merges": ["Ġ t", "h e"], "tokenizer.ggml.eos_token_id": 1,
                       "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.padding_token_id": 1,
                       "tokenizer.chat_template": CHATML}
        self.fields.update(changes)
        self.fields = {k: v for k, v in self.fields.items() if v is not None}

    def gguf_metadata(self):
        return dict(self.fields)


def tiny(arch: str, vocab: int = VOCAB) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, rope_theta=5e4, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=arch == "qwen2",
                      qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    # Norm scales and biases away from their 1 / 0 initial values, so a mix-up of any two would show.
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape) if x.ndim == 1 else x,
                          params)
    return nnx.merge(graphdef, params)


def write_tiny_gguf(path, arch: str = "llama", **tokenizer_changes):
    """A tiny F32 GGUF of `arch` at `path` with TinyTokenizer(**tokenizer_changes)'s metadata."""
    save_gguf_checkpoint(tiny(arch), path, TinyTokenizer(**tokenizer_changes), file_type="F32")
    return path
