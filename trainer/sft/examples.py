"""Conversations -> training examples: token ids, which of them are trained, truncation, the val split.

An example is the template's pieces encoded one by one (trainer/sft/template.py), then the end-of-text
token, trained. Its first token is never trained: nothing of the example comes before it. An example
longer than --max-seq-len tokens is cut to that length from the end (the prompt stays, the reply loses
its tail and its end marker) and counted as truncated, with the trained tokens cut; one whose prompt
alone fills --max-seq-len keeps no trained token and is dropped (counted). A template whose markers alone
do not fit is an error.

Validation holds out whole records, a fraction of them picked by a fixed-seed shuffle (the same split
whatever --seed and --max-seq-len), so val loss is measured on conversations never trained on.
"""
from dataclasses import dataclass

import numpy as np

from trainer.errors import UserError
from trainer.sft.template import Template

SPLIT_SEED = 0  # the validation split does not follow --seed: runs that differ in seed share it


@dataclass
class Examples:
    """Examples stored flat: example i is tokens[offsets[i]:offsets[i + 1]], trained likewise."""
    tokens: np.ndarray    # token ids
    trained: np.ndarray   # uint8: 1 where the token is a trained target (predicting it is scored)
    offsets: np.ndarray   # int64, len(examples) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.trained[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, pairs: list[tuple[list[int], list[int]]], vocab_size: int) -> "Examples":
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        offsets = np.zeros(len(pairs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in pairs])
        tokens = np.fromiter((i for ids, _ in pairs for i in ids), dtype=dtype, count=int(offsets[-1]))
        trained = np.fromiter((m for _, mask in pairs for m in mask), dtype=np.uint8, count=int(offsets[-1]))
        return cls(tokens, trained, offsets)


def encode(conversations: list[list[dict]], template: Template, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, trained flags) of every conversation, untruncated."""
    pieces = [template.pieces(c) for c in conversations]
    encoded = iter(tokenizer.encode_batch([text for p in pieces for text, _ in p]))
    out = []
    for conversation in pieces:
        ids, mask = [], []
        for (_, trained), piece_ids in zip(conversation, encoded):
            ids += piece_ids
            mask += [int(trained)] * len(piece_ids)
        ids.append(tokenizer.eot_id)
        mask.append(1)
        mask[0] = 0
        out.append((ids, mask))
    return out


def marker_tokens(template: Template, tokenizer) -> int:
    """Tokens one exchange with empty texts takes: the template's own share of every example."""
    exchange = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    return sum(len(tokenizer.encode(text)) for text, _ in template.pieces(exchange)) + 1


def truncate(pairs: list[tuple[list[int], list[int]]], max_len: int) -> tuple[list, dict]:
    """Examples cut to max_len tokens, those left without a trained token dropped; (kept, counts)."""
    kept, counts = [], {"truncated": 0, "truncated_trained_tokens": 0, "dropped": 0}
    for ids, mask in pairs:
        if len(ids) > max_len:
            counts["truncated"] += 1
            counts["truncated_trained_tokens"] += sum(mask[max_len:])
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            counts["dropped"] += 1
            continue
        kept.append((ids, mask))
    return kept, counts


def split_indices(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) record indices, each in file order; at least one val record when fraction > 0 and n > 1."""
    n_val = min(n - 1, int(fraction * n + 0.5)) if fraction > 0 else 0
    if fraction > 0 and n > 1:
        n_val = max(1, n_val)
    val = set(np.random.default_rng(SPLIT_SEED).permutation(n)[:max(0, n_val)].tolist())
    return [i for i in range(n) if i not in val], sorted(val)


def build(conversations: list[list[dict]], template: Template, tokenizer, max_seq_len: int,
          val_fraction: float) -> tuple[Examples, Examples, dict]:
    """(train, val, stats) from conversations; stats count records, truncation and tokens."""
    markers = marker_tokens(template, tokenizer)
    if markers >= max_seq_len:
        raise UserError(f"template '{template.name}' takes {markers} tokens for its markers and end-of-text alone, "
                        f"which leaves no room for a prompt and a reply in --max-seq-len {max_seq_len}; raise "
                        "--max-seq-len or choose a shorter template")
    pairs = encode(conversations, template, tokenizer)
    train_idx, val_idx = split_indices(len(pairs), val_fraction)
    train, counts = truncate([pairs[i] for i in train_idx], max_seq_len)
    val, val_counts = truncate([pairs[i] for i in val_idx], max_seq_len)
    if not train:
        raise UserError(f"every training example's prompt fills --max-seq-len {max_seq_len} tokens, so none keeps a "
                        "token to learn; raise --max-seq-len (up to the model's block size)")
    stats = {"records": len(pairs), "train_examples": len(train), "val_examples": len(val),
             **{k: counts[k] + val_counts[k] for k in counts},
             "train_tokens": sum(len(ids) for ids, _ in train), "trained_tokens": sum(sum(m) for _, m in train)}
    vocab = tokenizer.vocab_size
    return Examples.from_lists(train, vocab), Examples.from_lists(val, vocab), stats
