"""GPT: one model for GPT-2 and GPT-2.5; components are picked from the ModelConfig.

    logits = model(idx)                       # (B, T, vocab_size); padded vocab rows never returned
    loss = model(idx, targets)                # mean next-token cross-entropy, no fp32 logits held
    nll = model(idx, targets, reduction="none")  # (B, T) per-token losses (evaluation)
    cache = model.new_kv_cache(batch_size, max_len)
    logits = model(prompt, kv_cache=cache)    # fills the cache, positions 0..T-1
    logits = model(next_token, kv_cache=cache)  # one step at position cache.length

State-dict keys follow Hugging Face naming: GPT-2 models use GPT2LMHeadModel's keys
(transformer.wte, transformer.h.N.attn.c_attn, ...), GPT-2.5 models use LlamaForCausalLM's
(model.embed_tokens, model.layers.N.self_attn.q_proj, ...), so `models.hf` is a key-for-key copy.
"""
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.config import ModelConfig
from models.layers import (
    MLP,
    CausalSelfAttention,
    DocumentMask,
    LMHead,
    SwiGLU,
    make_norm,
    positions_in_documents,
    rope_cache,
)


class KVCache:
    """Per-layer key/value buffers for incremental decoding."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device, dtype):
        shape = (batch_size, n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0      # tokens already stored (committed after the whole forward)
        self.max_len = max_len
        self._layer = 0

    def layer(self, i):
        self._layer = i
        return self

    def update(self, k, v):
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to {end}")
        self.keys[self._layer][:, :, self.length:end] = k
        self.values[self._layer][:, :, self.length:end] = v
        return self.keys[self._layer][:, :, :end], self.values[self._layer][:, :, :end]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). Its parts' names are the
    layout's (models/config.py Layout); the MLP is GPT-2's GELU MLP or GPT-2.5's SwiGLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        names = config.layout
        setattr(self, names.attn_norm, make_norm(config))
        setattr(self, names.attn, CausalSelfAttention(config))
        setattr(self, names.mlp_norm, make_norm(config))
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)  # GPT-2.5: SwiGLU
        self.resid_dropout = nn.Dropout(config.dropout)
        self.names = names

    @property
    def attention(self) -> CausalSelfAttention:
        return getattr(self, self.names.attn)

    def forward(self, x, rope=None, kv_cache=None, doc_mask=None):
        norm1, norm2 = getattr(self, self.names.attn_norm), getattr(self, self.names.mlp_norm)
        x = x + self.resid_dropout(self.attention(norm1(x), rope, kv_cache, doc_mask))
        return x + self.resid_dropout(self.mlp(norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, names = config, config.layout
        root = nn.Module()  # transformer.* (GPT2LMHeadModel) or model.* (LlamaForCausalLM)
        setattr(root, names.embed, nn.Embedding(c.padded_vocab_size, c.n_embd))
        learned = c.pos_emb == "learned"  # GPT-2.5: RoPE instead
        if learned and not names.positions_last:
            root.wpe = nn.Embedding(c.block_size, c.n_embd)
        setattr(root, names.blocks, nn.ModuleList(Block(c) for _ in range(c.n_layer)))
        setattr(root, names.final_norm, make_norm(c))
        if learned and names.positions_last:
            root.wpe = nn.Embedding(c.block_size, c.n_embd)
        setattr(self, names.root, root)
        self.drop = nn.Dropout(c.dropout)
        self.lm_head = LMHead(c.n_embd, c.padded_vocab_size, c.vocab_size, c.logit_softcap)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if c.rotary_dim:
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.activation_checkpointing = False  # a training switch: set_activation_checkpointing
        self.reset_parameters()
        self.refresh_buffers()

    def refresh_buffers(self):
        """(Re)compute the RoPE tables in fp32 on the weights' device (also after a meta-device build)."""
        if self.config.rotary_dim:
            device = self.wte.weight.device
            device = None if device.type == "meta" else device
            self.rope_cos, self.rope_sin = rope_cache(self.config.rotary_dim, self.config.block_size,
                                                      self.config.rope_theta, device)

    # -- the parts, whatever the layout calls them ------------------------------------------------------
    @property
    def root(self) -> nn.Module:
        return getattr(self, self.config.layout.root)

    @property
    def wte(self) -> nn.Embedding:
        return getattr(self.root, self.config.layout.embed)

    @property
    def wpe(self):
        return getattr(self.root, "wpe", None)

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.root, self.config.layout.blocks)

    @property
    def norm_f(self) -> nn.Module:
        return getattr(self.root, self.config.layout.final_norm)

    # -- initialisation ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer) (zero with
        zero_init_proj: each block starts as the identity), zero biases, unit norm gains. The tied head
        shares the embedding, so it is initialised once."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for block in self.blocks:
            for proj in block.attention.out_proj(), block.mlp.out_proj():
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.activation_checkpointing = bool(enabled)

    # -- counting ----------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared (tied) tensor counted once. non_embedding drops token and position
        embeddings (the PaLM / nanoGPT convention for FLOPs; a tied head is then not counted either)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() already de-duplicates tied weights
        if non_embedding:
            total -= self.wte.weight.numel()
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T.

        N = non-embedding parameters plus the LM head matmul (vocab x n_embd, it is a real matmul
        per token even when tied); L layers, H heads, Q head dim, T sequence length (attention
        scores and the weighted sum of values).
        """
        c = self.config
        n = self.num_params(non_embedding=True) + c.padded_vocab_size * c.n_embd
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    # -- forward -----------------------------------------------------------------------------------
    def new_kv_cache(self, batch_size: int, max_len=None, device=None, dtype=None) -> KVCache:
        c = self.config
        weight = self.wte.weight
        return KVCache(c.n_layer, batch_size, c.n_head, max_len or c.block_size, c.head_dim,
                       device or weight.device, dtype or weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None, kv_cache: KVCache = None,
                reduction: str = "mean", segments: torch.Tensor = None) -> torch.Tensor:
        """Logits (B, T, vocab_size); or, given targets (B, T), the loss (models.loss, `reduction`).

        `segments` (B, T) numbers the documents packed into each sequence (non-decreasing along it): a token
        then attends only within its own document, and positions restart at 0 at each document's start, so
        a document's outputs do not depend on the documents before it."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        if segments is not None and kv_cache is not None:
            raise ValueError("segments (document masking) is a training and evaluation input, not for decoding")
        positions = doc_mask = None
        if segments is not None:
            positions = positions_in_documents(segments)
            doc_mask = DocumentMask(segments, self.config.dropout if self.training else 0.0)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions if positions is not None else torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        rope = None
        if self.config.rotary_dim and positions is not None:  # per-sequence tables, broadcast over heads
            rope = (self.rope_cos[positions].float()[:, None], self.rope_sin[positions].float()[:, None])
        elif self.config.rotary_dim:
            rope = (self.rope_cos[start:start + T].float(), self.rope_sin[start:start + T].float())
        for i, block in enumerate(self.blocks):
            cache = kv_cache.layer(i) if kv_cache is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, None, doc_mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, doc_mask)
        if kv_cache is not None:
            kv_cache.length += T
        return self.lm_head(self.norm_f(x), targets, reduction)
