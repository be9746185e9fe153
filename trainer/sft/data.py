"""SFTData: tokenized instruction data as the data source of a training run (the interface
trainer/data/shards.py's Dataset gives pretraining: streams, what checkpoints record, a one-line description).

The examples were made once (trainer/sft/examples.py); `record_in` writes them into RUN/sft/ when the
run starts for real, so a failed start writes nothing and a resumed run reads back exactly what its
checkpoints' cursors refer to.
"""
from pathlib import Path
from typing import Optional

from trainer.sft import store
from trainer.sft.examples import Examples
from trainer.sft.stream import SFTTrainStream, SFTValStream
from trainer.sft.template import Template

RUN_SUBDIR = "sft"


class SFTData:
    def __init__(self, train: Examples, val: Examples, identity: dict, stats: dict, tokenizer, packing: bool,
                 stored_at: Optional[Path] = None):
        self.train, self.val, self.identity, self.stats = train, val, identity, stats
        self.tokenizer_spec, self.vocab_size, self.eot_id = tokenizer.spec, tokenizer.vocab_size, tokenizer.eot_id
        self.template = Template.from_dict(identity["template"])
        self.packing = packing
        self.path = identity["source"]
        self.train_tokens = int(stats["train_tokens"])
        self.stored_at = stored_at  # None: made by this invocation, not yet written

    def train_stream(self, seq_len: int, global_batch: int, seed: int) -> SFTTrainStream:
        return SFTTrainStream(self.train, seq_len, global_batch, seed, self.packing, self.eot_id)

    def val_stream(self, seq_len: int, batch_size: int) -> SFTValStream:
        return SFTValStream(self.val, seq_len, batch_size, self.packing, self.eot_id)

    def describe(self) -> str:
        s = self.stats
        share = s["trained_tokens"] / max(1, s["train_tokens"])
        return (f"{self.path} ({s['format']}, template {self.template.name}, tokenizer {self.tokenizer_spec}): "
                f"{s['records']:,} records -> {s['train_examples']:,} train / {s['val_examples']:,} val examples, "
                f"{s['truncated']:,} truncated to --max-seq-len {self.identity['max_seq_len']} "
                f"({s['truncated_trained_tokens']:,} trained tokens cut), {s['dropped']:,} dropped (prompt alone too "
                f"long); {s['train_tokens']:,} train tokens, {s['trained_tokens']:,} of them trained ({share:.0%})"
                f"{', packed' if self.packing else ', padded'}")

    def segments(self, x):
        """(B, T) example numbers of a packed batch for --doc-masking: every example ends with end-of-text."""
        ends = x == self.eot_id
        return ends.cumsum(dim=-1) - ends.long()

    def client_state(self) -> dict:
        """Checkpoints record the template (for generate --chat and the HF export) and what made the data."""
        return {"template": self.template.to_dict(), "sft": {**self.identity, "stats": self.stats,
                                                             "packing": self.packing}}

    def summary(self) -> dict:
        keys = ("records", "train_examples", "val_examples", "truncated", "truncated_trained_tokens", "dropped")
        return {k: self.stats[k] for k in keys}

    def record_in(self, run_dir) -> None:
        """Write the examples into RUN/sft/ unless they were read from a directory already."""
        if self.stored_at is None:
            self.stored_at = Path(run_dir) / RUN_SUBDIR
            store.write(self.stored_at, self.train, self.val, self.identity, self.stats)
