"""Building blocks: norms, rotary embeddings, causal self-attention, the two MLPs and the LM head.

The LM head computes the loss itself when given targets (models/loss.py). Norms compute in fp32
whatever the activation dtype (bf16 statistics over 1024+ channels lose precision) and cast back.
RoPE uses the rotate-half layout, which is what HF Llama uses, so GPT-2.5 weights map to
LlamaForCausalLM without permuting q/k.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.loss import linear_cross_entropy


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x):
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (x.size(-1),), self.weight.float(), bias, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """GPT-2.5: RMSNorm instead of LayerNorm (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def relu_squared(x):
    """relu(x)^2: the MLP activation of the modded-nanogpt speedrun (transformers calls it "relu2")."""
    return F.relu(x).square()


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return LayerNorm(config.n_embd, config.norm_eps, config.bias)


def rope_cache(rotary_dim: int, length: int, theta: float, device=None):
    """cos/sin tables of shape (length, rotary_dim) in fp32, rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first cos.size(-1) dims of x (B, H, T, D); the rest pass through (partial rotary). cos / sin are
    (T, r), or (B, 1, T, r) for per-sequence positions (documents in a packed sequence)."""
    r = cos.size(-1)
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    x_rot = (x_rot.float() * cos + rotated.float() * sin).type_as(x)
    return torch.cat([x_rot, x_pass], dim=-1) if x_pass.numel() else x_rot


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through SDPA (flash / memory-efficient kernels on GPU).

    Classic GPT-2 keeps HF's fused `c_attn` (q, k, v in one matmul) and `c_proj`; GPT-2.5 uses
    Llama's separate q/k/v/o projections so its state dict maps key-for-key to HF Llama.
    """

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim, self.n_embd = config.n_head, config.head_dim, config.n_embd
        self.dropout = config.dropout
        self.fused_qkv = config.layout.fused_qkv
        if config.qk_norm:  # Qwen3's q_norm / k_norm: over each head's dims, with a gain, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        if self.fused_qkv:  # GPT-2: q, k, v in one matmul
            self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
            self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        else:  # GPT-2.5: Llama's projections
            self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def out_proj(self):
        return self.c_proj if self.fused_qkv else self.o_proj

    def forward(self, x, rope=None, kv_cache=None, doc_mask=None):
        B, T, C = x.shape
        if self.fused_qkv:
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim) for t in (q, k, v))
        if self.qk_norm:  # on (B, T, H, D), contiguous for the projections
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        # With a cache, the T new queries sit at the end of the keys: causal means "up to own position".
        causal_offset = k.size(2) - T
        if doc_mask is not None:  # causal within each document of a packed sequence (document_mask)
            y = doc_mask.attend(q, k, v, self.dropout if self.training else 0.0)
        elif causal_offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=causal_offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.out_proj()(y)


class DocumentMask:
    """Attention restricted to each token's own document in a packed sequence: token i sees token j when both
    lie in the same document and j <= i. `segments` (B, T) numbers the documents along each sequence.

    On a GPU this is FlexAttention with a block mask (blocks wholly outside every document are skipped);
    elsewhere, and with attention dropout (which FlexAttention lacks), SDPA with the boolean (B, 1, T, T)
    mask. Both are built once per forward and shared by every layer."""

    def __init__(self, segments: torch.Tensor, dropout: float = 0.0):
        T = segments.size(1)
        self.block_mask = self.mask = None
        # Under torch's deterministic mode, SDPA (whose kernels that flag governs) rather than FlexAttention.
        flex_ok = not dropout and not torch.are_deterministic_algorithms_enabled()
        if segments.is_cuda and flex_ok and _flex_attention() is not None:
            from torch.nn.attention.flex_attention import create_block_mask

            def same_document_causal(b, h, q, kv):
                return (segments[b, q] == segments[b, kv]) & (kv <= q)

            self.block_mask = create_block_mask(same_document_causal, segments.size(0), None, T, T,
                                                device=segments.device)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
            self.mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]

    def attend(self, q, k, v, dropout_p: float):
        if self.block_mask is not None:
            return _flex_attention()(q, k, v, block_mask=self.block_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)


def positions_in_documents(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its document: 0 at every document's first token."""
    T = segments.size(1)
    index = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


_FLEX = {}


def _flex_attention():
    """FlexAttention, compiled (its eager form is a slow reference), or None where torch lacks it."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        except ImportError:
            _FLEX["fn"] = None
    return _FLEX["fn"]


class MLP(nn.Module):
    """GPT-2's MLP: Linear -> GELU (tanh approximation, as OpenAI's GPT-2; relu^2 with relu_squared) -> Linear."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.act = relu_squared if config.relu_squared else gelu_tanh

    def out_proj(self):
        return self.c_proj

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class SwiGLU(nn.Module):
    """GPT-2.5: SwiGLU MLP with Llama's names (gate_proj, up_proj, down_proj); the gate's activation is
    relu^2 instead of SiLU with relu_squared (Llama / Qwen3 `hidden_act="relu2"`)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.act = relu_squared if config.relu_squared else F.silu

    def out_proj(self):
        return self.down_proj

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LMHead(nn.Linear):
    """The output projection over the padded vocabulary. Without targets it returns logits over the real
    vocabulary (pad columns are never returned, so never sampled); with targets it returns the loss
    straight from its input (models.loss.linear_cross_entropy), so a training step never holds fp32
    logits. The loss is computed inside this module's forward so that ZeRO-3, which gathers a
    module's parameters around its forward, has the weight whole."""

    def __init__(self, n_embd: int, padded_vocab_size: int, vocab_size: int, softcap: float = 0.0):
        super().__init__(n_embd, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size
        self.softcap = softcap  # > 0: logits = softcap * tanh(logits / softcap)

    def forward(self, x, targets=None, reduction: str = "mean"):
        if targets is not None:
            return linear_cross_entropy(x, self.weight, targets, reduction, vocab_size=self.vocab_size,
                                        softcap=self.softcap)
        logits = F.linear(x, self.weight)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits[..., :self.vocab_size] if self.vocab_size != self.out_features else logits
