"""The language-model loss: one function, called by training and by every evaluation.

Perplexity therefore measures exactly what training optimises. The cross-entropy is computed in
fp32 whatever the logits' dtype (bf16 log-softmax over 50k classes loses too much precision), and
targets equal to IGNORE_INDEX (-1) are not scored.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy.

    logits: (..., V) scores for the next token; targets: (...) token ids, IGNORE_INDEX to skip.
    reduction: "mean" over scored tokens (training), "sum" (evaluation accumulates token-weighted
    totals itself), or "none" (per-token losses, same shape as targets).
    """
    flat = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return flat.view(targets.shape) if reduction == "none" else flat
