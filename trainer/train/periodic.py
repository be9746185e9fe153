"""Periodic HellaSwag during pretraining (`--hellaswag-every N --hellaswag-jsonl FILE`).

Scoring is trainer.eval.evaluate's HellaSwag (completion style, lowest ending loss wins), run through the
DeepSpeed engine so ZeRO-3's gathered parameters and the training precision are what gets scored;
the examples are split across ranks (every rank runs the same number of forwards) and the counts
all-reduced inside `evaluate.hellaswag`. The jsonl is read and validated when the run starts, so a
wrong path fails within seconds instead of hours into a run.
"""
import torch

from trainer.data.tokenizer import get_tokenizer


class _EngineModel:
    """What evaluate.score_example needs from a model (`.config`, `model(x, y, reduction=...)`), backed by the
    engine. DeepSpeedEngine.config is the DeepSpeed dict, hence the wrapper."""

    def __init__(self, engine):
        self.engine = engine
        self.config = engine.module.config

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)


class PeriodicHellaSwag:
    def __init__(self, jsonl: str, every: int, tokenizer_spec: str):
        from trainer.eval import evaluate

        self.examples = evaluate.read_hellaswag(jsonl)
        self.tokenizer = get_tokenizer(tokenizer_spec)
        self.every = every

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def score(self, engine) -> dict:
        """{'acc', 'acc_norm', 'n'} of the engine's model; every rank must call this at the same steps."""
        from trainer.eval import evaluate

        engine.eval()  # no dropout while scoring
        try:
            with torch.no_grad():
                return evaluate.hellaswag(_EngineModel(engine), self.tokenizer, self.examples, engine.device)
        finally:
            engine.train()
