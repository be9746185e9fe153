"""Our GPT as an lm-evaluation-harness language model (a `lm_eval.api.model.TemplateLM`), in process.

Requests are tokenized with the tokenizer the model was trained with and scored by the model itself,
following what lm-eval's Hugging Face model (`lm_eval --model hf`) does, so both give the same numbers:
- loglikelihood: context + continuation cut from the left to block_size + 1 tokens; the continuation's
  log-probability (the loss module's cross-entropy on the logits, models.loss) and whether greedy
  decoding would produce it. An empty context is the end-of-text token (TemplateLM does this).
- loglikelihood_rolling: end-of-text + the text through eval-ppl's windows with context = stride =
  block size (trainer.eval.evaluate.sliding_windows): every token scored once, each window as long as the
  model allows, the model's own loss.
- generate_until: greedy (or sampled, with do_sample) decoding with the KV cache (trainer.eval.generate),
  the context cut from the left to block_size - max_gen_toks tokens (at least 1), stopping at
  end-of-text, at one of `until` (cut there) or after max_gen_toks tokens.

Data-parallel (under the deepspeed launcher or torchrun): lm-eval sees a single process on every rank
(`world_size` 1), so every rank builds the same requests and computes the same metrics; the model
work is split here. Requests are sorted by length and cut into batches the same way whatever the rank
count, rank r scores batches r, r + N, ..., and the results are all-reduced (each entry is written by
exactly one rank), so N ranks give the numbers of one. Every rank runs the same number of forward
passes (a rank out of work runs a one-token dummy), so a collective inside the forward (ZeRO-3) can
never hang.
"""
import sys
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from models.loss import IGNORE_INDEX
from models.loss import cross_entropy as lm_loss
from trainer import dist
from trainer.dist import all_reduce_sum
from trainer.eval.evaluate import sliding_windows
from trainer.eval.generate import next_tokens


class HarnessLM(TemplateLM):
    """`model`: a GPT (or anything with `.config` and `model(x)` / `model(x, y, reduction=...)`)."""

    def __init__(self, model, tokenizer, device, batch_size: int = 8, max_gen_toks: int = 256, seed: int = 1234,
                 progress: bool = False):
        super().__init__()
        self.model, self.tok, self._device = model, tokenizer, torch.device(device)
        self.batch_size, self.default_max_gen_toks, self.seed = batch_size, max_gen_toks, seed
        self.block_size = model.config.block_size
        self.progress = progress and dist.is_main()

    # ---- what lm-eval asks of a TemplateLM ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.spec

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._score([(context, continuation) for _, context, continuation in requests], greedy=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, request in enumerate(requests):
            stream = [self.eot_token_id, *self.tok_encode(request.args[0])]
            for begin, end, first in sliding_windows(len(stream), self.block_size, self.block_size):
                pairs.append((stream[begin:first], stream[first:end]))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(pairs, greedy=False)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        world = dist.world_size()
        texts = {}
        for i in tqdm(dist.rank_share(len(requests), dist.rank(), world), disable=not self.progress,
                      desc="generate_until", file=sys.stderr, dynamic_ncols=True):
            if i is None:  # this rank idles in lock-step
                self._generate(None, {})
            else:
                texts[i] = self._generate(*requests[i].args, seed=self.seed + i)
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, texts)
            texts = {i: t for part in gathered for i, t in part.items()}
        return [texts[i] for i in range(len(requests))]

    # ---- scoring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], greedy: bool) -> list[tuple[float, bool]]:
        """(log-probability of the continuation given the context, whether it is the greedy continuation)."""
        rows = []
        for context, continuation in pairs:
            whole = (list(context) + list(continuation))[-(self.block_size + 1):]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        world = dist.world_size()
        logprob = torch.zeros(len(rows), dtype=torch.float64)
        is_greedy = torch.zeros(len(rows), dtype=torch.float64)
        for b in tqdm(dist.rank_share(len(batches), dist.rank(), world), disable=not self.progress,
                      desc="loglikelihood" if greedy else "loglikelihood_rolling", file=sys.stderr, dynamic_ncols=True):
            if b is None:
                self._dummy_forward(greedy)  # same number of forward passes on every rank
                continue
            batch = batches[b]
            width = max(len(rows[i][0]) for i in batch) - 1
            x = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            y = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for r, i in enumerate(batch):
                whole, n = rows[i]
                x[r, :len(whole) - 1] = torch.tensor(whole[:-1])
                if n:
                    y[r, len(whole) - 1 - n:len(whole) - 1] = torch.tensor(whole[-n:])
            x, y = x.to(self._device), y.to(self._device)
            scored = y != IGNORE_INDEX
            if greedy:
                logits = self.model(x)[scored]  # only the continuation's positions: (scored tokens, vocab)
                nll = torch.zeros(y.shape, dtype=torch.float64, device=self._device)
                nll[scored] = lm_loss(logits, y[scored], reduction="none").double()
                hits = torch.ones(y.shape, dtype=torch.bool, device=self._device)
                hits[scored] = logits.argmax(dim=-1) == y[scored]
                is_greedy[batch] = hits.all(dim=1).double().cpu()
            else:
                nll = self.model(x, y, reduction="none").double()
            logprob[batch] = -nll.sum(dim=1).cpu()
        if world > 1:
            both = all_reduce_sum(torch.stack([logprob, is_greedy]).to(self._device)).cpu()
            logprob, is_greedy = both[0], both[1]
        return [(float(lp), bool(g)) for lp, g in zip(logprob.tolist(), is_greedy.tolist())]

    def _dummy_forward(self, greedy: bool) -> None:
        x = torch.full((1, 1), self.eot_token_id, dtype=torch.long, device=self._device)
        self.model(x) if greedy else self.model(x, x, reduction="none")

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, context: Optional[str], gen_kwargs: dict, seed: int = 0) -> str:
        """One request's continuation; context None: no request, only the forward passes the other ranks need."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.default_max_gen_toks)
        eos = self.tok.decode([self.eot_token_id])
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        steps, new = None, []
        if context is not None and max_gen_toks > 0:
            prompt = self.tok_encode(context)[-max(1, self.block_size - max_gen_toks):] or [self.eot_token_id]
            steps = next_tokens(self.model, prompt, temperature, kwargs.get("top_k"), kwargs.get("top_p"),
                                torch.Generator().manual_seed(seed))
        while True:
            if not self._any_rank(steps is not None):
                break
            if steps is None:
                self._dummy_forward(greedy=True)
                continue
            token = next(steps)
            if token == self.eot_token_id:
                steps = None
                continue
            new.append(token)
            if len(new) >= max_gen_toks or any(term and term in self.tok.decode(new) for term in until):
                steps = None
        return postprocess_generated_text(self.tok.decode(new), until, None)

    def _any_rank(self, flag: bool) -> bool:
        if dist.world_size() == 1:
            return flag
        return bool(all_reduce_sum(torch.tensor([float(flag)], device=self._device)).item())
