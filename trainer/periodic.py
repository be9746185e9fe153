"""Periodic HellaSwag during pretraining (`--hellaswag-every N --hellaswag-jsonl FILE`).

The loop calls `maybe_hellaswag` after every optimizer step on every rank; it does nothing except
on steps that are due (every N steps and the last one). Scoring is trainer.evaluate's HellaSwag
(completion style, lowest ending loss wins), run through the DeepSpeed engine so ZeRO-3's gathered
parameters and the training precision are what gets scored; the examples are split across ranks
and the counts all-reduced inside `evaluate.hellaswag`. The result is logged like val loss: one
record {step, hellaswag_acc, hellaswag_acc_norm, hellaswag_n} in metrics.jsonl / TensorBoard / W&B.

The jsonl is read and validated on the first call (step 1), so a wrong path fails within seconds
instead of at step N, hours into a run.
"""
from typing import Optional

import torch

from trainer import dist

_examples: dict = {}     # jsonl path -> parsed examples (read once per process)
_tokenizers: dict = {}   # tokenizer spec -> Tokenizer


class _EngineModel:
    """What evaluate.score_example needs from a model (`.config`, `model(x, y, reduction=...)`), backed by the
    engine. DeepSpeedEngine.config is the DeepSpeed dict, hence the wrapper."""

    def __init__(self, engine):
        self.engine = engine
        self.config = engine.module.config

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)


def _load(cfg, tokenizer_spec: str):
    from trainer import evaluate
    from trainer.tokenizer import get_tokenizer

    if cfg.hellaswag_jsonl not in _examples:
        _examples[cfg.hellaswag_jsonl] = evaluate.read_hellaswag(cfg.hellaswag_jsonl)
    if tokenizer_spec not in _tokenizers:
        _tokenizers[tokenizer_spec] = get_tokenizer(tokenizer_spec)
    return _examples[cfg.hellaswag_jsonl], _tokenizers[tokenizer_spec]


def maybe_hellaswag(engine, cfg, step: int, tokenizer_spec: str, writer, last: bool = False) -> Optional[dict]:
    """Score HellaSwag when `step` is due; returns {'acc', 'acc_norm', 'n'} then, else None.

    Every rank must call this at the same steps (the counts are all-reduced).
    """
    if not cfg.hellaswag_every:
        return None
    examples, tokenizer = _load(cfg, tokenizer_spec)
    if step % cfg.hellaswag_every and not last:
        return None
    from trainer import evaluate

    engine.eval()  # no dropout while scoring
    try:
        with torch.no_grad():
            result = evaluate.hellaswag(_EngineModel(engine), tokenizer, examples, engine.device)
    finally:
        engine.train()
    writer.log({"step": step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"],
                "hellaswag_n": result["n"]})
    if dist.is_main():
        from tqdm import tqdm

        tqdm.write(f"step {step}: hellaswag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}, "
                   f"{result['n']} examples)")
    return result
