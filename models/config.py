"""ModelConfig and the preset registry: one dataclass describes GPT-2 and GPT-2.5 alike.

Field names follow GPT-2 / nanoGPT (block_size, vocab_size, n_layer, n_head, n_embd, dropout,
bias); the switches norm / mlp / pos_emb turn the classic block into the GPT-2.5 (Llama-style)
block. `get_config(name, **overrides)` validates names and fields and says which are valid.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBS = ("learned", "rope")
RETIRED_FIELDS = ("activation_checkpointing",)


@dataclass
class ModelConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos_emb: str = "learned"
    rotary_dim: int = 0              # rotary on the first rotary_dim dims of each head (0 = off, learned pos only)
    tie_embeddings: bool = True
    ffn_hidden: Optional[int] = None  # default 4*n_embd (gelu) or Llama's 8/3*n_embd rounded to 256 (swiglu)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    padded_vocab_size: Optional[int] = None  # embedding/head rows, >= vocab_size (e.g. 50304); logits stay vocab_size
    # Options from the modded-nanogpt speedrun (bench/sample_efficiency.py measures them); off in the GPT-2 / 2.5
    # presets.
    qk_norm: bool = False            # RMSNorm on each head's queries and keys, before RoPE (as Qwen3)
    relu_squared: bool = False       # relu(x)^2 in the MLP in place of GELU (gelu) or SiLU (swiglu)
    zero_init_proj: bool = False     # attention and MLP output projections start at zero
    logit_softcap: float = 0.0       # logits = logit_softcap * tanh(logits / logit_softcap); 0 = off

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ValueError(message)

        check(self.norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        check(self.mlp in MLPS, f"mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        check(self.pos_emb in POS_EMBS, f"pos_emb must be one of {', '.join(POS_EMBS)}, got {self.pos_emb!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        check(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.logit_softcap >= 0, f"logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
        if self.pos_emb == "rope" and not self.rotary_dim:
            self.rotary_dim = self.head_dim
        check(self.rotary_dim % 2 == 0 and 0 <= self.rotary_dim <= self.head_dim,
              f"rotary_dim must be even and at most the head dim {self.head_dim}, got {self.rotary_dim}")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        check(self.padded_vocab_size >= self.vocab_size,
              f"padded_vocab_size {self.padded_vocab_size} is smaller than vocab_size {self.vocab_size}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd if self.mlp == "gelu" else _llama_hidden(self.n_embd)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """A stored config (config.json, a checkpoint's model_config). Fields that older versions stored but
        that are not architecture (activation_checkpointing, now a training switch) are dropped."""
        return cls(**{k: v for k, v in values.items() if k not in RETIRED_FIELDS})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def llama_layout(self) -> bool:
        """SwiGLU models use Llama's module names (q/k/v/o_proj, gate/up/down_proj, model.layers.N);
        GELU models use GPT-2's (c_attn, c_fc, transformer.h.N), so each family maps key-for-key to HF."""
        return self.mlp == "swiglu"

    @property
    def layout(self) -> "Layout":
        return LLAMA_LAYOUT if self.llama_layout else GPT2_LAYOUT


@dataclass(frozen=True)
class Layout:
    """Where GPT-2 and GPT-2.5 differ in structure: only the names of the same pre-norm block's parts, which
    are the state-dict keys of GPT2LMHeadModel and of LlamaForCausalLM (so export and import are key-for-key
    copies), and GPT-2's fused q/k/v projection. Everything else GPT-2.5 changes (RMSNorm, SwiGLU, RoPE, no
    bias) is a config field of its own, chosen where the part is built.

        part               GPT-2              GPT-2.5 (Llama)
        model root         transformer        model
        token embedding    wte                embed_tokens
        block list         h                  layers
        final norm         ln_f               norm
        block: norm, attn  ln_1, attn         input_layernorm, self_attn
        block: norm, mlp   ln_2, mlp          post_attention_layernorm, mlp
        attention          c_attn (q,k,v), c_proj    q_proj, k_proj, v_proj, o_proj
        learned positions  wpe, after wte     wpe, after the final norm (the parameter order DeepSpeed's
                                              flat buffers, and so checkpoints, follow)
    """
    root: str
    embed: str
    blocks: str
    final_norm: str
    attn_norm: str
    attn: str
    mlp_norm: str
    fused_qkv: bool
    positions_last: bool  # learned positions (an option on GPT-2.5) registered after the final norm

GPT2_LAYOUT = Layout(root="transformer", embed="wte", blocks="h", final_norm="ln_f", attn_norm="ln_1", attn="attn",
                     mlp_norm="ln_2", fused_qkv=True, positions_last=False)
LLAMA_LAYOUT = Layout(root="model", embed="embed_tokens", blocks="layers", final_norm="norm",
                      attn_norm="input_layernorm", attn="self_attn", mlp_norm="post_attention_layernorm",
                      fused_qkv=False, positions_last=True)


def _llama_hidden(n_embd: int, multiple_of: int = 256) -> int:
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# GPT-2.5: the Llama block (RMSNorm, SwiGLU, RoPE, no biases) at GPT-2 sizes.
GPT25 = dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, norm_eps=1e-5)

# Presets hold only the fields they choose. Derived fields (ffn_hidden, rotary_dim, padded_vocab_size)
# are computed by ModelConfig from the final values, so an override such as `pos_emb=learned` or
# `n_embd=256` never leaves a value derived from the preset's own fields behind.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),                   # 124,439,808 params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),           # 354,823,168
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),            # 774,030,080
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),               # 1,557,611,200
    "gpt25": dict(GPT25, n_layer=12, n_head=12, n_embd=768),           # 123,551,232 (SwiGLU hidden 2048)
    "gpt25-medium": dict(GPT25, n_layer=24, n_head=16, n_embd=1024),   # 359,794,688 (hidden 2816)
    "gpt25-large": dict(GPT25, n_layer=36, n_head=20, n_embd=1280),    # 795,804,160 (hidden 3584)
    # GPT-2.5 with the modded-nanogpt options that measurably helped at our scale (bench/sample_efficiency.py
    # --ablation): QK-norm. An untied head helped alone but not on top of QK-norm; relu^2, zero-initialized
    # projections and a logit soft-cap did not help. Train it with Muon (configs/gpt25-speedrun.yaml).
    # 123,552,768 parameters (gpt25 + the norms' gains); exports to Qwen3ForCausalLM.
    "gpt25-speedrun": dict(GPT25, n_layer=12, n_head=12, n_embd=768, qk_norm=True),
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),  # 16,090,880 with GPT-2's vocab (demo)
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512),  # 136,960
}


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Embedding / head rows rounded up for fast matmuls (50257 -> 50304); the pad logits are never
    returned, sampled or scored."""
    return -(-vocab_size // multiple) * multiple


def list_configs() -> list[str]:
    return list(PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name with fields overridden; unknown names or fields list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config field(s) {', '.join(unknown)}; "
                         f"valid fields: {', '.join(sorted(fields))}")
    base = {**PRESETS[name], **overrides}
    return ModelConfig(**base)
