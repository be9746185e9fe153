"""The language-model loss: next-token cross-entropy in fp32 (fp64 for fp64 models), for training and
evaluation alike.

Two entry points compute the same numbers:

    cross_entropy(logits, targets)                  # from logits someone already has (HF models, scoring)
    linear_cross_entropy(hidden, weight, targets)   # from the head's input: what GPT(idx, targets) uses

The second never holds the (tokens x vocab) logits in fp32. It computes the head's output a chunk of
tokens at a time, takes the fp32 log-sum-exp of each row, and turns the chunk straight into its
gradient (softmax minus one-hot, the derivative of cross-entropy), kept in the model's dtype for the
backward matmuls. The plain path holds the logits in the model's dtype, an fp32 copy, the fp32
log-softmax saved for backward, and two more fp32 tensors of that size in backward: for GPT-2 at
micro-batch 8 x 1024 tokens up to 0.8 GB + 3 x 1.6 GB at its peak, against 0.8 GB here. The same
exp runs once per logit either way, and the head's three matmuls dominate its time.

Targets equal to IGNORE_INDEX (-1) are not scored; "mean" divides by the scored tokens.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -1
REDUCTIONS = ("mean", "sum", "none")
CHUNK_LOGITS = 1 << 23  # logits per chunk (32 MiB in fp32): matmuls still large, the extra memory bounded


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits: (..., V) scores for the next token; targets: (...) token ids, IGNORE_INDEX to skip.
    reduction: "mean" over scored tokens (training), "sum" (evaluation accumulates token-weighted
    totals itself), or "none" (per-token losses, same shape as targets)."""
    flat = F.cross_entropy(logits.reshape(-1, logits.size(-1)).to(_loss_dtype(logits)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
    return flat.view(targets.shape) if reduction == "none" else flat


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", vocab_size: int = 0, chunk_tokens: int = 0,
                         softcap: float = 0.0) -> torch.Tensor:
    """cross_entropy((hidden @ weight.T)[..., :vocab_size], targets, reduction), without fp32 logits.

    hidden: (..., C) the head's input; weight: (Vp, C) the head's weight, padded rows included;
    vocab_size: the real vocabulary (default Vp): rows past it are never scored and get no gradient.
    They stay in the matmuls (masked to -inf) because a padded width is what makes the matmuls fast:
    slicing to 50257 columns made the weight-gradient matmul 1.4-1.6x slower on CPU.
    targets: (...) ids. chunk_tokens: tokens per chunk (default: CHUNK_LOGITS logits per chunk).
    softcap: when > 0, the logits are softcap * tanh(logits / softcap) (models.layers.LMHead does the same).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    chunk = chunk_tokens or max(1, CHUNK_LOGITS // weight.size(0))
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    vocab_size = vocab_size or weight.size(0)
    if not 0 < vocab_size <= weight.size(0):
        raise ValueError(f"vocab_size {vocab_size} must be in 1..{weight.size(0)} (the weight's rows)")
    flat = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1),
                                     reduction, vocab_size, chunk, want_grad, float(softcap))
    return flat.view(targets.shape) if reduction == "none" else flat


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs, fp64 stays fp64."""
    return torch.promote_types(x.dtype, torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes per-token losses and, when a gradient is wanted, dloss/dlogits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, reduction, vocab_size, chunk, want_grad, softcap):
        n = hidden.size(0)
        scored = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~scored, 0).unsqueeze(1)
        dtype = _loss_dtype(hidden)
        losses = torch.empty(n, dtype=dtype, device=hidden.device)
        # dloss/dlogits of each token before the reduction's scaling, in the head's dtype
        dlogits = torch.empty(n, weight.size(0), dtype=hidden.dtype, device=hidden.device) if want_grad else None
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            z = F.linear(hidden[rows], weight).to(dtype)
            if softcap:
                z.div_(softcap).tanh_()
                slope = 1 - z.square() if want_grad else None  # d(softcap * tanh(x / softcap)) / dx
                z.mul_(softcap)
            if vocab_size < z.size(1):
                z[:, vocab_size:] = float("-inf")  # exp gives 0: no probability, no gradient
            tgt = safe_targets[rows]
            target_logit = z.gather(1, tgt).squeeze(1)
            row_max = z.amax(dim=1, keepdim=True)
            z.sub_(row_max).exp_()  # the one exp per logit, shared by the loss and its gradient
            sum_exp = z.sum(dim=1, keepdim=True)
            losses[rows] = (row_max + sum_exp.log()).squeeze(1) - target_logit
            if want_grad:
                z.div_(sum_exp)  # softmax
                z.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=z.dtype))
                if softcap:
                    z.mul_(slope)
                dlogits[rows] = z
            del z  # before the next chunk's logits exist, not after
        losses.masked_fill_(~scored, 0.0)
        n_scored = scored.sum()
        ctx.reduction = reduction
        if want_grad:
            ctx.save_for_backward(hidden, weight, dlogits, scored, n_scored)
        if reduction == "none":
            return losses
        total = losses.sum()
        # Like F.cross_entropy: a mean over zero scored tokens is nan, not a silent 0.
        return total / n_scored if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, dlogits, scored, n_scored = ctx.saved_tensors
        # Each token's dlogits row times its scale: 0 for unscored tokens, the reduction's factor (1/tokens
        # for "mean") or its own grad_out ("none"). A row scale commutes with both matmuls, so it is
        # applied, in fp32, on their small (tokens x n_embd) sides and dlogits is used as saved.
        dtype = _loss_dtype(hidden)
        grad_out = grad_out.to(dtype)
        if ctx.reduction == "none":
            row_scale = scored * grad_out
        else:
            row_scale = scored * (grad_out / n_scored if ctx.reduction == "mean" else grad_out)
        row_scale = row_scale.unsqueeze(1)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((dlogits @ weight).to(dtype) * row_scale).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = dlogits.t() @ (hidden.to(dtype) * row_scale).to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None
