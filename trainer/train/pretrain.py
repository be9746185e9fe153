"""Pretraining on token shards: where a pretraining run's data and model shape come from (the `Task` the
shared loop in trainer/train/loop.py runs), and the commands it suggests when it ends. With no --data the
run is the offline demo on the pydoc corpus, prepared on first use."""
from pathlib import Path

import models
from trainer import dist
from trainer.config import TrainConfig
from trainer.data.shards import Dataset
from trainer.errors import UserError
from trainer.train import loop


def open_dataset(cfg: TrainConfig) -> Dataset:
    if cfg.data is None:
        from trainer.data.convert import ensure_demo_data

        tokenizer = cfg.tokenizer or "bytes"
        target = Path("data") / f"pydoc-{tokenizer.replace(':', '_').replace('/', '_')}"
        if dist.is_main():
            ensure_demo_data(target, tokenizer=tokenizer)
        dist.barrier()
        cfg.data = str(target)
    elif cfg.tokenizer is not None:
        raise UserError("--tokenizer is only for the built-in demo data; with --data the tokenizer recorded in "
                        "the dataset's meta.json is used (convert your text with tools/convert_shards.py)")
    return Dataset.open(cfg.data)


def build_model_config(cfg: TrainConfig, dataset: Dataset) -> "models.ModelConfig":
    overrides = dict(cfg.model_overrides)
    if "vocab_size" in overrides and overrides["vocab_size"] != dataset.vocab_size:
        raise UserError(f"--set vocab_size={overrides['vocab_size']} does not match the dataset's tokenizer "
                        f"({dataset.tokenizer_spec}, vocab {dataset.vocab_size}); drop the override")
    overrides["vocab_size"] = dataset.vocab_size
    overrides.setdefault("padded_vocab_size", models.padded_vocab_size(dataset.vocab_size))
    try:
        return models.get_config(cfg.model, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(str(e))


def _next_steps(run_dir: Path) -> list[str]:
    return [f"python -m trainer.cli eval-ppl --model-path {run_dir}",
            f"python -m trainer.cli generate --model-path {run_dir} --prompt 'The '",
            f"python tools/zero_to_fp32.py {run_dir} {run_dir}/hf --hf",
            f"tensorboard --logdir {run_dir}/tb"]


PRETRAIN = loop.Task("pretrain", open_data=open_dataset, model_config=build_model_config, next_steps=_next_steps)


def run(cfg: TrainConfig, json_output: bool = False) -> dict:
    """Pretrain (or resume) the run `cfg` describes, on every rank of the launch (see loop.run)."""
    return loop.run(cfg, json_output=json_output, task=PRETRAIN)
