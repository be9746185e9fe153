"""Validation loss during training: the fixed first batches of the validation data, scored with the
model's own loss through the DeepSpeed engine (so ZeRO-3's gathered weights and the training
precision are what gets scored), token-weighted over all ranks: the mean over every scored target
(fine-tuning masks prompts and padding with IGNORE_INDEX; they count for nothing)."""
import torch

from models.loss import IGNORE_INDEX
from trainer import dist
from trainer.data.prefetch import document_segments
from trainer.data.shards import ValStream


def validation_loss(engine, val: ValStream, n_batches: int, device, segments_of=None) -> float:
    """Mean validation loss over min(n_batches, available) batches, split across ranks; `segments_of` (the
    data source's `segments`, with --doc-masking) scores each document within its own attention window."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for b in dist.rank_share(val.count(n_batches), dist.rank(), dist.world_size()):
            x, y = val.batch(b if b is not None else 0)
            segments = document_segments(segments_of(x), slice(None), device) if segments_of else None
            loss = engine(x.to(device), y.to(device), reduction="sum", segments=segments).double()
            if b is not None:  # a padding forward (see dist.rank_share) scores nothing
                total[0] += loss
                total[1] += (y != IGNORE_INDEX).sum()
    engine.train()
    dist.all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()
