"""Evaluation: perplexity with a strided sliding window, and HellaSwag completion scoring.

Perplexity scores every token of the text once, the first one conditioned on the end-of-text token
(the token every training document starts with), the rule of lm-evaluation-harness's rolling
loglikelihood. Windows feed the model at most `context` tokens; the first window predicts the first
`context` tokens, each later window the next `stride` ones with the tokens before them as context, and
every window reaches back as far as the context allows (the last one too). stride == context is
exactly lm-eval's `loglikelihood_rolling` (each block's first token sees the previous token); a smaller
stride gives every token at least context - stride + 1 tokens of context, as in the Hugging Face guide
"Perplexity of fixed-length models", minus the guide's unscored first token per window. Shard data
(`--data`) already starts with end-of-text (every document does), so nothing is prepended there. The
loss is the model's own, `model(x, y)` (models/loss.py), the function training minimises.
Results are token-weighted: nll = total NLL / scored tokens, ppl = exp(nll); bits per byte =
total NLL / ln 2 / UTF-8 bytes of the text (comparable across tokenizers); word-level
perplexity = exp(total NLL / whitespace-separated words), as the GPT-2 paper reports. Since every
token is scored, the bytes and words counted are exactly the ones the NLL covers.

Batches never mix window lengths and each rank takes whole batches, so a window's loss is
computed by the same kernel calls whatever the rank count; per-window sums are all-reduced in
float64 into a per-window table and added in window order, so 1 rank and N ranks agree.

HellaSwag (the seeds' completion style, as in llm.c / build-nanogpt): for each of the endings the
model sees context + " " + ending; the loss over the ending's tokens is summed (acc) and averaged
per token (acc_norm); the prediction is the ending with the lowest loss. Data: the official jsonl,
e.g. https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl (10,042
examples; keys ctx, endings, label).
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from models.loss import IGNORE_INDEX
from trainer import dist
from trainer.config import HellaSwagConfig, PplConfig
from trainer.errors import UserError, describe
from trainer.eval.device import resolve_dtype, setup_device
from trainer.train import hostmem

WIKITEXT_DEFAULT_CONFIG = "wikitext-103-raw-v1"


# ---- perplexity ----------------------------------------------------------------------------------

def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over a stream of n_tokens whose token 0 only conditions (the
    end-of-text prefix): tokens[begin:end-1] (at most `context` tokens) are fed and the predictions of
    tokens first_scored..end-1 are scored. Every token after token 0 is scored exactly once."""
    if context < 1:
        raise UserError(f"--context {context}: a window feeds at least 1 token")
    if not 1 <= stride <= context:
        raise UserError(f"--stride {stride} must be between 1 and --context {context} (a larger stride would "
                        "skip tokens)")
    windows, scored_to = [], 1
    while scored_to < n_tokens:
        end = min(scored_to + (stride if windows else context), n_tokens)
        windows.append((max(0, end - 1 - context), end, scored_to))
        scored_to = end
    return windows


@torch.no_grad()
def window_nlls(model, tokens: torch.Tensor, windows, batch_size: int, device, progress: bool = False,
                rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window (NLL sum, scored tokens) as float64 tensors over all windows (zeros for other ranks' windows)."""
    nll = torch.zeros(len(windows), dtype=torch.float64)
    count = torch.zeros(len(windows), dtype=torch.float64)
    # Batches of equal-length windows (only the last window can be shorter).
    batches, current = [], []
    for i, (begin, end, _) in enumerate(windows):
        if current and (len(current) == batch_size or end - begin != windows[current[0]][1] - windows[current[0]][0]):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    mine = dist.rank_share(len(batches), rank, world)
    bar = tqdm(total=len(mine), disable=not progress, desc="eval-ppl", unit="batch", dynamic_ncols=True,
               file=sys.stderr)
    for b in mine:
        padding = b is None  # the same number of forwards on every rank (dist.rank_share); its result is dropped
        batch = batches[0 if padding else b]
        rows = torch.stack([tokens[windows[i][0]:windows[i][1]] for i in batch])
        x = rows[:, :-1]
        y = rows[:, 1:].clone()
        for r, i in enumerate(batch):
            begin, _, first = windows[i]
            y[r, :first - begin - 1] = IGNORE_INDEX  # already scored by the previous window
        losses = model(x.to(device, non_blocking=True), y.to(device), reduction="none").double().cpu()
        bar.update(1)
        if padding:
            continue
        nll[batch] = losses.sum(dim=1)
        count[batch] = (y != IGNORE_INDEX).sum(dim=1).double()
    bar.close()
    return nll, count


def perplexity(model, tokens, context: int, stride: int, batch_size: int = 8, device="cpu",
               progress: bool = False, prefix: Optional[int] = None) -> dict:
    """{'nll', 'ppl', 'tokens', 'total_nll', 'windows'} for a 1-D token sequence; data-parallel when
    torch.distributed is initialised (every rank passes the same tokens). `prefix` (the end-of-text id) is
    fed before the first token so that it is scored too; None when the tokens already start with it."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if prefix is not None:
        tokens = np.concatenate([np.asarray([prefix], dtype=np.int64), tokens])
    tokens = torch.as_tensor(tokens)
    if tokens.numel() < 2:
        raise UserError("the text has no tokens to score")
    if context > model.config.block_size:
        raise UserError(f"--context {context} is larger than the model's block size {model.config.block_size}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    windows = sliding_windows(tokens.numel(), context, stride)
    nll, count = window_nlls(model, tokens, windows, batch_size, device, progress, dist.rank(), dist.world_size())
    if dist.world_size() > 1:
        both = dist.all_reduce_sum(torch.stack([nll, count]).to(device))
        nll, count = both[0].cpu(), both[1].cpu()
    total_nll, total_tokens = float(nll.sum()), int(count.sum())
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(mean), "tokens": total_tokens, "total_nll": total_nll,
            "windows": len(windows)}


# ---- perplexity: data sources -------------------------------------------------------------------


def load_text(cfg: PplConfig) -> str:
    if cfg.text_file:
        path = Path(cfg.text_file)
        if not path.is_file():
            raise UserError(f"--text-file {path}: no such file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--text-file {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise UserError(f"--hf-dataset needs the `datasets` package ({e})")
    config = cfg.hf_config
    if config is None and cfg.hf_dataset in ("wikitext", "Salesforce/wikitext"):
        config = WIKITEXT_DEFAULT_CONFIG
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, config, split=cfg.split)
    except Exception as e:  # datasets raises many types (network, missing split/config): one clear line
        raise UserError(f"cannot load --hf-dataset {cfg.hf_dataset} (config {config}, split {cfg.split}): "
                        f"{describe(e, line=0)}")
    if cfg.text_column not in ds.column_names:
        raise UserError(f"--hf-dataset {cfg.hf_dataset} has no column '{cfg.text_column}' (columns: "
                        f"{', '.join(ds.column_names)}); pass --text-column")
    # The HF perplexity guide's recipe: documents joined with blank lines into one stream.
    return "\n\n".join(ds[cfg.text_column])


def text_of_tokens(tokenizer, tokens: np.ndarray) -> tuple[str, int]:
    """(text, UTF-8 bytes) of a shard token stream, decoded document by document: end-of-text ids are
    boundaries, not text, so they add no bytes."""
    tokens = np.asarray(tokens)
    cuts = np.flatnonzero(tokens == tokenizer.eot_id)
    docs, start = [], 0
    for cut in [*cuts.tolist(), len(tokens)]:
        if cut > start:
            docs.append(tokenizer.decode(tokens[start:cut].tolist()))
        start = cut + 1
    return "\n\n".join(docs), sum(len(d.encode("utf-8")) for d in docs)


def _with_source(cfg: PplConfig) -> PplConfig:
    """The config with exactly one text source; a run directory alone brings its own validation shards."""
    from trainer.eval import modelio

    sources = [s for s in (cfg.data, cfg.text_file, cfg.hf_dataset) if s]
    if len(sources) > 1:
        raise UserError("give exactly one of --data DIR, --text-file FILE, --hf-dataset NAME")
    if sources:
        return cfg
    trained_on = modelio.training_data_of(cfg.model_path)
    if trained_on is None:
        raise UserError("give one of --data DIR, --text-file FILE, --hf-dataset NAME to score "
                        f"{cfg.model_path} on (only a run directory brings its own dataset)")
    if not Path(trained_on).is_dir():
        raise UserError(f"{cfg.model_path} trained on {trained_on}, which is not a directory from here; "
                        "run from where it was trained or pass --data DIR")
    if dist.is_main():
        print(f"scoring the validation shards of {trained_on}, the run's training data "
              "(--data / --text-file / --hf-dataset for another)", file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, data=trained_on)


def _text_to_score(cfg: PplConfig, spec: Optional[str]):
    """(tokenizer, tokens, text, UTF-8 bytes, prefix id or None) of the configured source."""
    from trainer.eval import modelio

    if cfg.data:
        from trainer.data.shards import Dataset

        dataset = Dataset.open(cfg.data)
        if spec and dataset.tokenizer_spec != spec:
            dist.print0(f"note: the dataset was tokenized with {dataset.tokenizer_spec}, the model with {spec}")
        tokenizer = modelio.require_tokenizer(dataset.tokenizer_spec, cfg.data)
        tokens = dataset.val_tokens_array()
        if len(tokens) == 0:
            raise UserError(f"{cfg.data} has no val_*.bin shards to evaluate on; convert it with --val-tokens N")
        if cfg.max_tokens:
            tokens = tokens[:cfg.max_tokens]
        text, n_bytes = text_of_tokens(tokenizer, tokens)
        prefix = None if int(tokens[0]) == tokenizer.eot_id else tokenizer.eot_id  # documents start with it
        return tokenizer, tokens, text, max(n_bytes, 1), prefix
    tokenizer = modelio.require_tokenizer(spec, cfg.model_path)
    text = load_text(cfg)
    if not text.strip():
        raise UserError(f"{cfg.text_file or cfg.hf_dataset}: the text is empty")
    tokens = tokenizer.encode(text)
    if cfg.max_tokens and len(tokens) > cfg.max_tokens:
        tokens = tokens[:cfg.max_tokens]
        text = tokenizer.decode(tokens)
    return tokenizer, tokens, text, len(text.encode("utf-8")), tokenizer.eot_id


def run_ppl(cfg: PplConfig, json_output: bool = False) -> dict:
    """`eval-ppl`: load the model at --model-path, score the source, print (and return) the result."""
    from trainer.eval import modelio

    cfg = _with_source(cfg)
    device = setup_device(cfg.device)
    hostmem.keep_freed_memory(device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, spec, info = modelio.load_model(cfg.model_path, device=device, dtype=dtype, tokenizer=cfg.tokenizer)
    context = cfg.context or model.config.block_size
    if context > model.config.block_size:
        raise UserError(f"--context {context} is larger than the model's block size {model.config.block_size}")
    stride = cfg.stride or max(1, context // 2)

    started = time.time()
    tokenizer, tokens, text, n_bytes, prefix = _text_to_score(cfg, spec)
    if int(np.max(tokens)) >= model.config.vocab_size:
        raise UserError(f"token id {int(np.max(tokens))} is outside the model's vocabulary "
                        f"({model.config.vocab_size}); the data was made with another tokenizer")
    result = perplexity(model, tokens, context, stride, cfg.batch_size, device,
                        progress=cfg.progress and dist.is_main(), prefix=prefix)
    total = result.pop("total_nll")
    result["bits_per_byte"] = total / math.log(2) / n_bytes
    result["bytes"] = n_bytes
    if cfg.word_level:
        words = len(text.split())
        result["words"] = words
        result["word_ppl"] = math.exp(total / max(words, 1))
    result.update(context=context, stride=stride, dtype=str(dtype).replace("torch.", ""),
                  model=info["path"], tokenizer=tokenizer.spec, world_size=dist.world_size(),
                  seconds=round(time.time() - started, 3))
    if dist.is_main():
        line = (f"ppl {result['ppl']:.4f} | nll {result['nll']:.5f} | {result['tokens']:,} tokens | "
                f"{result['bits_per_byte']:.4f} bits/byte")
        if cfg.word_level:
            line += f" | word ppl {result['word_ppl']:.3f} ({result['words']:,} words)"
        print(line + f" | context {context} stride {stride} {result['dtype']}", flush=True)
        if json_output:
            print(json.dumps(result), flush=True)
    return result


# ---- HellaSwag -----------------------------------------------------------------------------------

@dataclass
class HellaSwagExample:
    context: str
    endings: list
    label: int


def read_hellaswag(path, limit: Optional[int] = None) -> list[HellaSwagExample]:
    """The official jsonl (one object per line with ctx, endings, label); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--jsonl {path}: no such file (HellaSwag validation data: "
                        "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl)")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}); expected one HellaSwag object per line")
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object with ctx, endings, label")
            missing = [k for k in ("ctx", "endings", "label") if k not in obj]
            if missing:
                raise UserError(f"{where}: missing {', '.join(missing)} (HellaSwag lines have ctx, endings, label)")
            endings, label = obj["endings"], obj["label"]
            if not isinstance(obj["ctx"], str) or not isinstance(endings, list) or len(endings) < 2 \
                    or not all(isinstance(e, str) and e for e in endings):
                raise UserError(f"{where}: ctx must be a string and endings a list of at least 2 non-empty strings")
            if isinstance(label, str) and label.strip().isdigit():
                label = int(label)
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
                raise UserError(f"{where}: label {obj['label']!r} is not an index into the {len(endings)} endings")
            examples.append(HellaSwagExample(obj["ctx"], endings, label))
            if limit and len(examples) >= limit:
                break
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def hellaswag_rows(tokenizer, example: HellaSwagExample, block_size: int):
    """Token rows (context + ending) and, per row, where the ending starts; the context is cut from the
    left when a row would not fit the model."""
    ctx = tokenizer.encode(example.context)
    rows, starts = [], []
    for ending in example.endings:
        end = tokenizer.encode(" " + ending)  # endings continue the context after a space (as in the seeds)
        room = block_size + 1 - len(end)      # a row of block_size + 1 tokens feeds block_size inputs
        if room < 1:
            end, room = end[:block_size], 1
        row = ctx[-room:] + end
        rows.append(row)
        starts.append(len(row) - len(end))
    return rows, starts


@torch.no_grad()
def score_example(model, tokenizer, example: HellaSwagExample, device) -> tuple[list, list]:
    """(summed loss, mean loss) over each ending's tokens, with the model's own loss."""
    rows, starts = hellaswag_rows(tokenizer, example, model.config.block_size)
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width - 1, dtype=torch.long)
    y = torch.full((len(rows), width - 1), IGNORE_INDEX, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        t = torch.tensor(row)
        x[i, :len(row) - 1] = t[:-1]
        y[i, start - 1:len(row) - 1] = t[start:]  # only the ending's tokens are scored
    losses = model(x.to(device), y.to(device), reduction="none").double().cpu()
    n = (y != IGNORE_INDEX).sum(dim=1).double()
    sums = losses.sum(dim=1)
    return sums.tolist(), (sums / n).tolist()


def hellaswag(model, tokenizer, examples, device, progress: bool = False) -> dict:
    """{'acc', 'acc_norm', 'n'}: acc from the summed ending loss, acc_norm from the per-token mean;
    examples are split across ranks when torch.distributed is initialised."""
    rank, world = dist.rank(), dist.world_size()
    counts = torch.zeros(3, dtype=torch.float64)
    mine = dist.rank_share(len(examples), rank, world)  # the same number of forwards on every rank
    for i in tqdm(mine, disable=not progress, desc="hellaswag", dynamic_ncols=True, file=sys.stderr):
        example = examples[i if i is not None else 0]
        sums, means = score_example(model, tokenizer, example, device)
        if i is None:  # padding: scored by no rank's count
            continue
        counts[0] += int(np.argmin(sums)) == example.label
        counts[1] += int(np.argmin(means)) == example.label
        counts[2] += 1
    if world > 1:
        counts = dist.all_reduce_sum(counts.to(device)).cpu()
    n = int(counts[2])
    return {"acc": float(counts[0]) / n, "acc_norm": float(counts[1]) / n, "n": n}


def run_hellaswag(cfg: HellaSwagConfig, json_output: bool = False) -> dict:
    """`eval-hellaswag`: load the model at --model-path, score the examples, print (and return) the result."""
    from trainer.eval import modelio

    examples = read_hellaswag(cfg.jsonl, cfg.limit)
    dev = setup_device(cfg.device)
    torch_dtype = resolve_dtype(cfg.dtype, dev)
    model, spec, info = modelio.load_model(cfg.model_path, device=dev, dtype=torch_dtype, tokenizer=cfg.tokenizer)
    tok = modelio.require_tokenizer(spec, cfg.model_path)
    started = time.time()
    result = hellaswag(model, tok, examples, dev, progress=cfg.progress and dist.is_main())
    result.update(model=info["path"], dtype=str(torch_dtype).replace("torch.", ""),
                  seconds=round(time.time() - started, 3))
    if dist.is_main():
        print(f"HellaSwag: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | {result['n']} examples",
              flush=True)
        if json_output:
            print(json.dumps(result), flush=True)
    return result
