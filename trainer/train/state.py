"""TrainState: where a run is. Saved in every checkpoint's client state and restored on resume, as
trainer/checkpoint/contents.py says.

The data order is a pure function of (seed, dataset, seq_len, global batch, cursor), so `cursor`
is all a resumed run needs to see exactly the batches an uninterrupted run would.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainState:
    step: int = 0          # optimizer steps taken, skipped updates included
    cursor: int = 0        # global sample cursor: the next step trains on samples cursor .. cursor + global_batch - 1
    tokens: int = 0        # training tokens seen
    trained_tokens: Optional[int] = None  # targets scored (fine-tuning's trained tokens); None when all are
    skipped: int = 0       # updates skipped for non-finite gradients, in total
    rollbacks: int = 0     # in this invocation (saved for the record, not restored: a resume gets a fresh budget)
    skips_in_a_row: int = 0  # not saved: a resume starts counting again

    def advance(self, global_batch: int, seq_len: int, skipped: bool, trained: Optional[int] = None) -> None:
        self.step += 1
        self.cursor += global_batch
        self.tokens += global_batch * seq_len
        if trained is not None:
            self.trained_tokens = (self.trained_tokens or 0) + trained
        self.skipped += int(skipped)
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
