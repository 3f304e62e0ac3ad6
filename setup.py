"""grpo_jax: Group Relative Policy Optimization for language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="grpo_jax",
    version="0.1.0",
    description="GRPO (Group Relative Policy Optimization) for language models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["grpo_jax", "grpo_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.10",
        "chex>=0.1.87",
        "tensorflow-datasets>=4.9",
        "absl-py>=2.0",
        "ml_collections>=0.1.1",
        "numpy>=1.26",
        "tokenizers>=0.15",
        "jinja2>=3.1",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
        "safetensors>=0.4.1",  # numpy reader and writer; 0.4.1 is the first to read BF16 into numpy
        "gguf>=0.10",  # llama.cpp's GGUF reader, writer and (de)quantizers (numpy)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.6", "tensorboard>=2.15",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "wandb>=0.31,<0.32"],  # the offline-run test reads its record format
        "wandb": ["wandb>=0.17"],
    },
)
