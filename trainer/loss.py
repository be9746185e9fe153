"""The language-model loss for the trainer: models/loss.py, so that training, validation, eval-ppl and
every benchmark score the same function.

`lm_loss(logits, targets)` scores logits someone already holds (a Hugging Face model in the
benchmark, the tests' references); our GPT computes the same loss itself, without fp32 logits, as
`model(idx, targets)`, and that is what training and evaluation call.
"""
from models.loss import IGNORE_INDEX, cross_entropy as lm_loss, linear_cross_entropy

__all__ = ["IGNORE_INDEX", "lm_loss", "linear_cross_entropy"]
