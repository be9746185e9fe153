"""Text generation: temperature / top-k / top-p sampling with a KV cache, streamed to stdout.

The cache path and the plain path feed the model the same context (the last block_size tokens),
so at temperature 0 they produce the same tokens: the prompt fills the cache once, then each
step feeds one token. When the cache is full (prompt + generated reaches block_size) every
further step re-fills it from the last block_size tokens, which is exactly what the plain path
computes. Sampling draws on the CPU from fp32 probabilities with a generator seeded per sample
(seed + i), so sample i of `--seed S` equals sample 0 of `--seed S+i`.

`--chat` (or `--template`) generates a reply of a fine-tuned model: the prompt is one user message (after
a `--system` message, if any) in the model's chat template (trainer/sft/template.py), encoded as in
training, and the sample ends at the template's end marker (or end-of-text), which is not shown.
"""
import json
import sys
from itertools import islice
from typing import Callable, Iterator, Optional

import torch

from trainer import dist
from trainer.config import GenerateConfig
from trainer.errors import UserError


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if temperature < 0:
        raise UserError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise UserError(f"--top-k {top_k} must be >= 0 (0 = off)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p {top_p} must be in (0, 1]")


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Logits (..., V) with everything outside the top-k / nucleus set to -inf (the most likely token always stays)."""
    logits = logits.clone()
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (shifted, so the first always stays).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k=None, top_p=None, generator=None) -> int:
    """One token id from 1-D next-token logits."""
    logits = logits.float().cpu()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def next_tokens(model, prompt_ids: list[int], temperature: float = 1.0, top_k=None, top_p=None, generator=None,
                use_cache: bool = True) -> Iterator[int]:
    """Yield the tokens that follow prompt_ids, without end: exactly one forward pass of the model per token."""
    block = model.config.block_size
    device = model.wte.weight.device
    ids = list(prompt_ids)
    cache = None
    while True:
        if not use_cache:
            logits = model(torch.tensor([ids[-block:]], device=device))
        elif cache is None or cache.length >= block:
            cache = model.new_kv_cache(1, block)
            logits = model(torch.tensor([ids[-block:]], device=device), kv_cache=cache)
        else:
            logits = model(torch.tensor([ids[-1:]], device=device), kv_cache=cache)
        token = sample_next(logits[0, -1], temperature, top_k, top_p, generator)
        ids.append(token)
        yield token


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 top_p=None, eot_id: Optional[int] = None, generator=None, use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time; stops after max_new_tokens or before yielding eot_id."""
    if not prompt_ids:
        raise UserError("the prompt has no tokens; pass --prompt TEXT (an empty prompt starts from end-of-text)")
    steps = next_tokens(model, prompt_ids, temperature, top_k, top_p, generator, use_cache)
    for token in islice(steps, max_new_tokens):
        if eot_id is not None and token == eot_id:
            return
        yield token


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int], prompt_text: str) -> str:
    """Text of the new tokens, decoded together with the prompt (SentencePiece drops a leading space
    when a continuation is decoded alone)."""
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    return tokenizer.decode(list(new_ids))


def until_stop(text: str, stop: Optional[str]) -> tuple[str, bool]:
    """(the text before `stop`, whether it appeared). Until it does, a tail that may still become it, and the
    whitespace before that tail, are held back (templates put a newline before their end marker)."""
    if not stop:
        return text, False
    at = text.find(stop)
    if at >= 0:
        return text[:at].rstrip(), True
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            text = text[:-k]
            break
    return text.rstrip(), False


def sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
           seed: int = 1337, use_cache: bool = True, stop_at_eot: bool = True,
           on_text: Optional[Callable[[str], None]] = None, prompt_ids: Optional[list[int]] = None,
           stop: Optional[str] = None) -> str:
    """One continuation of `prompt` (text without the prompt); `on_text` receives it piece by piece.

    prompt_ids: the prompt already encoded (a chat template's; `prompt` is then not used). stop: text that
    ends the sample (a template's end marker); the sample is what comes before it.
    """
    check_sampling(temperature, top_k, top_p)
    if prompt_ids is None:
        prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
        prompt_text = tokenizer.decode(prompt_ids) if prompt else ""
        base_ids = prompt_ids if prompt else []
    else:
        prompt_text, base_ids = tokenizer.decode(prompt_ids), prompt_ids
    if len(prompt_ids) > model.config.block_size:
        # Only the last block_size tokens can be seen anyway; say so rather than silently dropping text.
        print(f"note: the prompt has {len(prompt_ids)} tokens; the model sees only the last "
              f"{model.config.block_size}", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)
    new_ids, shown = [], ""
    for token in generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                              tokenizer.eot_id if stop_at_eot else None, generator, use_cache):
        new_ids.append(token)
        if on_text is None and stop is None:
            continue
        text, finished = until_stop(continuation_text(tokenizer, base_ids, new_ids, prompt_text), stop)
        if on_text is not None and not text.endswith("\ufffd") and text.startswith(shown):  # whole UTF-8 characters
            on_text(text[len(shown):])
            shown = text
        if finished:
            break
    text = continuation_text(tokenizer, base_ids, new_ids, prompt_text)
    before, finished = until_stop(text, stop)
    text = before if finished else text
    if on_text is not None and text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown):])
    return text


def chat_template(cfg: GenerateConfig, info: dict):
    """The template --chat / --template asks for (--template, else the one recorded with the model), or None."""
    from trainer.sft.template import Template, load_template

    if cfg.template:
        return load_template(cfg.template)
    if not cfg.chat:
        if cfg.system:
            raise UserError("--system is a chat message: pass --chat (or --template) too")
        return None
    if info.get("template"):
        return Template.from_dict(info["template"], where=f"the chat template recorded with {cfg.model_path}")
    raise UserError(f"--chat: {cfg.model_path} records no chat template (it was not fine-tuned with `finetune`); "
                    "name one with --template plain (or chatml, alpaca, a JSON file)")


def run(cfg: GenerateConfig, json_output: bool = False) -> dict:
    """`generate`: sample from the model at cfg.model_path; streams text, or prints {prompt, samples} with
    `json_output`. Returns that dict."""
    from trainer.eval import modelio
    from trainer.eval.device import resolve_dtype, setup_device

    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} must be at least 1")
    if cfg.num_samples < 1:
        raise UserError(f"--num-samples {cfg.num_samples} must be at least 1")
    device = setup_device(cfg.device)
    model, spec, info = modelio.load_model(cfg.model_path, device=device, dtype=resolve_dtype(cfg.dtype, device),
                                           tokenizer=cfg.tokenizer)
    tokenizer = modelio.require_tokenizer(spec, cfg.model_path)
    template = chat_template(cfg, info)
    prompt_ids = None
    if template is not None:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
            [{"role": "user", "content": cfg.prompt}]
        prompt_ids = template.prompt_ids(tokenizer, messages)
    stream = dist.is_main() and not json_output

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    samples = []
    for i in range(cfg.num_samples):
        if stream:
            if cfg.num_samples > 1:
                emit(f"{'-' * 20} sample {i + 1}/{cfg.num_samples} {'-' * 20}\n")
            if template is None:  # a chat reply is shown alone
                emit(cfg.prompt)
        samples.append(sample(model, tokenizer, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                              cfg.top_p, cfg.seed + i, cfg.use_cache, cfg.stop_at_eot,
                              on_text=emit if stream else None, prompt_ids=prompt_ids,
                              stop=template.stop if template else None))
        if stream:
            emit("\n")
    result = {"prompt": cfg.prompt, "samples": samples, "model": info["path"], "tokenizer": tokenizer.spec,
              "seed": cfg.seed, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    if template is not None:
        result.update(template=template.name, system=cfg.system)
    if dist.is_main() and json_output:
        print(json.dumps(result), flush=True)
    return result
