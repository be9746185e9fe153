"""`finetune`: supervised fine-tuning (instruction tuning) of a pretrained model, on pretraining's machinery.

    python -m trainer.cli finetune --init-from PATH --data DATA --out RUN [pretrain's options]

PATH is anything --model-path takes (a run, a checkpoint, a consolidated or Hugging Face model
directory, a hub name): the run takes that model's architecture, weights and tokenizer. DATA is
instruction data in a file or on the hub (trainer/sft/records.py), or a directory of tokenized examples
such as another run's RUN/sft (trainer/sft/store.py). This module is only the `Task` that pretraining's
setup and loop run (trainer/train/loop.py): where the data and the model's shape come from. The DeepSpeed
engine, ZeRO stages, precision, activation checkpointing, checkpoints and exact resume, non-finite-step
recovery, --max-time, metrics and TensorBoard, and tools/zero_to_fp32.py are pretraining's.

The examples are tokenized once, on rank 0, and handed to the other ranks; they are written to RUN/sft
when the run starts for real, and a resumed run reads them back from there (after checking they were
made from the same data with the same settings), so resuming is exact even for hub datasets.
"""
import dataclasses
from pathlib import Path

import models
from trainer import dist
from trainer.config import FinetuneConfig
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import UserError
from trainer.eval import modelio
from trainer.sft import store
from trainer.sft.data import RUN_SUBDIR, SFTData
from trainer.sft.records import FORMATS
from trainer.sft.template import load_template
from trainer.train.loop import Task

PROBE = "Tokenizer probe: Ünïcödé, 1234, <tags>\n\tand code() {}"  # two tokenizers that encode it alike are one


def run(cfg: FinetuneConfig, json_output: bool = False) -> dict:
    from trainer.train import loop

    check(cfg)
    return loop.run(cfg, json_output, task=FINETUNE)


def check(cfg: FinetuneConfig) -> None:
    """The fine-tuning settings, before anything heavy starts."""
    if not cfg.init_from:
        raise UserError("finetune needs --init-from PATH: the pretrained model to start from (a run, checkpoint, "
                        "model directory or Hugging Face name)")
    if not cfg.data:
        raise UserError("finetune needs --data: a .jsonl / .jsonl.gz / .parquet file (or glob), hf:NAME[:CONFIG]"
                        "[@SPLIT], or a directory of tokenized examples")
    if cfg.sft_format not in ("auto", *FORMATS):
        raise UserError(f"--format {cfg.sft_format}: choose auto, {', '.join(FORMATS)}")
    if isinstance(cfg.val_fraction, bool) or not isinstance(cfg.val_fraction, (int, float)) \
            or not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be at least 0 and below 1, got {cfg.val_fraction!r}")
    if cfg.val_fraction == 0 and cfg.eval_every:
        raise UserError("--val-fraction 0 holds out nothing for val loss; also pass --eval-every 0")
    load_template(cfg.template)


def open_data(cfg: FinetuneConfig) -> SFTData:
    """The run's examples: read back from RUN/sft or a given directory, or tokenized now on rank 0."""
    base, recorded, _ = modelio.describe_model(cfg.init_from)
    tokenizer = base_tokenizer(cfg, base, recorded)
    max_len = cfg.seq_len or base.block_size
    if max_len > base.block_size:
        raise UserError(f"--max-seq-len {max_len} is longer than the base model's context (block_size "
                        f"{base.block_size}); lower it")
    cfg.seq_len = max_len  # the window the loop trains on (pretrain's seq_len)
    if store.is_store(cfg.data):
        return _checked(cfg, _prepared(cfg, tokenizer))
    template = load_template(cfg.template)
    identity = {"source": cfg.data, "format": cfg.sft_format, "template": template.to_dict(),
                "tokenizer": tokenizer.spec, "max_seq_len": max_len, "val_fraction": cfg.val_fraction,
                "fingerprint": store.fingerprint(cfg.data)}
    saved = Path(cfg.out) / RUN_SUBDIR
    if store.is_store(saved):
        meta = store.read_meta(saved)
        if meta["identity"] == identity:
            train, val, meta = store.read(saved)
            return _checked(cfg, SFTData(train, val, identity, meta["stats"], tokenizer, cfg.packing, stored_at=saved))
        if cfg.resume != "never":
            changed = store.differences(meta["identity"], identity) or "other data"
            raise UserError(f"{saved} holds the examples this run was trained on, and they were made otherwise: "
                            f"{changed}; rerun with the settings it was trained with to resume it, or pass "
                            "--resume never to start over (or choose another --out)")
    return _checked(cfg, _tokenize(cfg, identity, template, tokenizer))


def _checked(cfg: FinetuneConfig, data: SFTData) -> SFTData:
    """Too few held-out examples for one validation batch is an error now, not at the first evaluation."""
    if cfg.eval_every:  # (--micro-batch auto is chosen later: one example per batch is the least it can be)
        data.val_stream(cfg.seq_len, 1 if cfg.micro_batch == "auto" else cfg.micro_batch).count(1)
    return data


def base_tokenizer(cfg: FinetuneConfig, base: "models.ModelConfig", recorded):
    """The base model's tokenizer (--tokenizer only where it records none), checked against its vocabulary."""
    if cfg.tokenizer and recorded and not same_tokenizer(cfg.tokenizer, get_tokenizer(recorded)):
        raise UserError(f"--tokenizer {cfg.tokenizer} differs from the tokenizer the base model {cfg.init_from} "
                        f"records ({recorded}); drop --tokenizer (it is for base models that record none)")
    spec = recorded or cfg.tokenizer
    if not spec:
        raise UserError(f"the base model {cfg.init_from} records no tokenizer; pass --tokenizer (gpt2, bytes, "
                        "hf:PATH, sp:PATH)")
    tokenizer = get_tokenizer(spec)
    if tokenizer.vocab_size != base.vocab_size:
        raise UserError(f"tokenizer {spec} has {tokenizer.vocab_size:,} tokens but the base model {cfg.init_from} "
                        f"has a vocabulary of {base.vocab_size:,}: they do not belong together; pass the "
                        "tokenizer the model was trained with")
    return tokenizer


def same_tokenizer(spec: str, tokenizer) -> bool:
    """Whether `spec` names a tokenizer that encodes like `tokenizer` (the same spec, or a copy of its files)."""
    if spec == tokenizer.spec:
        return True
    try:
        other = get_tokenizer(spec)
    except UserError:
        return False
    return (other.vocab_size, other.eot_id, other.encode(PROBE)) == \
        (tokenizer.vocab_size, tokenizer.eot_id, tokenizer.encode(PROBE))


def _prepared(cfg: FinetuneConfig, tokenizer) -> SFTData:
    """--data DIR: examples tokenized before (another run's RUN/sft, or a copy of it)."""
    train, val, meta = store.read(cfg.data)
    identity = meta["identity"]
    if not same_tokenizer(identity["tokenizer"], tokenizer):
        raise UserError(f"--data {cfg.data} was tokenized with {identity['tokenizer']}, but the base model "
                        f"{cfg.init_from} uses {tokenizer.spec}; fine-tune from the data's source instead, which "
                        "tokenizes it with the base model's tokenizer")
    if identity["max_seq_len"] > cfg.seq_len:
        raise UserError(f"--data {cfg.data} holds examples of up to {identity['max_seq_len']} tokens, longer than "
                        f"--max-seq-len {cfg.seq_len}; pass --max-seq-len {identity['max_seq_len']} or start from "
                        "the data's source")
    return SFTData(train, val, identity, meta["stats"], tokenizer, cfg.packing, stored_at=Path(cfg.data))


def _tokenize(cfg: FinetuneConfig, identity: dict, template, tokenizer) -> SFTData:
    """Read and tokenize the records on rank 0 and hand the examples (or its error) to every rank."""
    from trainer.sft.examples import build
    from trainer.sft.records import read_conversations

    payload = None
    if dist.is_main():
        print(f"tokenizing {cfg.data} (template {template.name}, tokenizer {tokenizer.spec})", flush=True)
        try:
            fmt, conversations = read_conversations(cfg.data, cfg.sft_format)
            train, val, stats = build(conversations, template, tokenizer, cfg.seq_len, cfg.val_fraction)
            payload = (train, val, {**stats, "format": fmt}, None)
        except UserError as e:
            payload = (None, None, None, e.message)
    train, val, stats, error = dist.broadcast_object(payload)
    if error is not None:
        raise UserError(error)
    return SFTData(train, val, identity, stats, tokenizer, cfg.packing)


def model_config(cfg: FinetuneConfig, data: SFTData) -> "models.ModelConfig":
    """The base model's architecture (vocabulary padded as pretraining pads it); --set may change what is not
    architecture, such as dropout: anything else is refused when the weights are copied in."""
    base, _, _ = modelio.describe_model(cfg.init_from)
    fields = {**dataclasses.asdict(base), "padded_vocab_size": models.padded_vocab_size(base.vocab_size),
              **cfg.model_overrides}
    try:
        return models.ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise UserError(f"--set: {e}")


def next_steps(run_dir: Path) -> list[str]:
    return [f"python -m trainer.cli generate --model-path {run_dir} --chat --prompt 'How do I ...?'",
            f"python tools/zero_to_fp32.py {run_dir} {run_dir}/hf --hf   # the chat template goes with it",
            f"python -c \"from transformers import pipeline; print(pipeline('text-generation', model='{run_dir}/hf')"
            f"([{{'role': 'user', 'content': 'How do I ...?'}}], max_new_tokens=100)[0]['generated_text'][-1])\"",
            f"tensorboard --logdir {run_dir}/tb"]


FINETUNE = Task("finetune", open_data=open_data, model_config=model_config, next_steps=next_steps)
