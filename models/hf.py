"""Conversion to and from Hugging Face `transformers`: pure state-dict key maps plus thin helpers.

Classic GPT-2 <-> GPT2LMHeadModel: same key names; HF stores its Conv1D weights as (in, out), so
the four projection matrices are transposed. GPT-2.5 <-> LlamaForCausalLM: identical key names
and layouts (rotate-half RoPE on both sides, so q/k need no permutation); with qk_norm the same
block plus Qwen3's q_norm / k_norm is Qwen3ForCausalLM. relu_squared is transformers' "relu2"
activation in all three. Padded vocabulary rows
are dropped on export and re-created (zeros) on import. Switch combinations neither HF class can
express are refused with the field that prevents it. transformers is imported lazily so that
`import models` needs torch only.
"""
import torch

from models.config import ModelConfig
from models.gpt import GPT

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_family(config: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3', or ValueError naming what none of the HF classes can express."""
    gpt2 = dict(norm="layernorm", mlp="gelu", pos_emb="learned", rotary_dim=0, bias=True, qk_norm=False,
                logit_softcap=0.0)
    llama = dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", rotary_dim=config.head_dim, qk_norm=False,
                 logit_softcap=0.0)
    qwen3 = dict(llama, qk_norm=True, bias=False)
    families = {"gpt2": gpt2, "llama": llama, "qwen3": qwen3}
    for family, wanted in families.items():
        if all(getattr(config, k) == v for k, v in wanted.items()):
            return family
    target = "gpt2" if not config.llama_layout else "qwen3" if config.qk_norm else "llama"
    wanted = families[target]
    bad = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(config, k) != v]
    raise ValueError(f"this model cannot be exported to Hugging Face {HF_CLASSES[target]}: {', '.join(bad)}")


def hf_class(config: ModelConfig):
    """The transformers model class that describes the same network."""
    import transformers

    return getattr(transformers, HF_CLASSES[hf_family(config)])


def hf_config(config: ModelConfig, eot_id=None):
    """The transformers config that describes the same network. eot_id: the tokenizer's end-of-text id,
    which starts every training document and ends generation, so it is both bos and eos (default: the
    last vocabulary id, where the GPT-2 and byte tokenizers keep it)."""
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    eot = config.vocab_size - 1 if eot_id is None else int(eot_id)
    family = hf_family(config)
    if family == "gpt2":
        return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                          n_layer=config.n_layer, n_head=config.n_head, n_inner=config.ffn_hidden,
                          activation_function="relu2" if config.relu_squared else "gelu_new",
                          resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                          attn_pdrop=config.dropout, layer_norm_epsilon=config.norm_eps,
                          tie_word_embeddings=config.tie_embeddings, architectures=["GPT2LMHeadModel"],
                          bos_token_id=eot, eos_token_id=eot)
    common = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.ffn_hidden,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.n_head, head_dim=config.head_dim,
                  hidden_act="relu2" if config.relu_squared else "silu",
                  max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                  tie_word_embeddings=config.tie_embeddings, attention_bias=config.bias,
                  attention_dropout=config.dropout, architectures=[HF_CLASSES[family]],
                  bos_token_id=eot, eos_token_id=eot)
    if family == "qwen3":
        return Qwen3Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, mlp_bias=config.bias)


def config_from_hf(hf_cfg, **overrides) -> ModelConfig:
    """Our ModelConfig for a GPT2Config, LlamaConfig or Qwen3Config (other architectures: ValueError)."""
    kind = getattr(hf_cfg, "model_type", None)
    tie = bool(getattr(hf_cfg, "tie_word_embeddings", True))
    if kind == "gpt2":
        values = dict(block_size=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.n_layer,
                      n_head=hf_cfg.n_head, n_embd=hf_cfg.n_embd, ffn_hidden=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
                      norm_eps=hf_cfg.layer_norm_epsilon, tie_embeddings=tie, dropout=0.0,
                      relu_squared=hf_cfg.activation_function == "relu2")
    elif kind in ("llama", "qwen3"):
        if (hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads) != hf_cfg.num_attention_heads:
            raise ValueError("grouped-query attention (num_key_value_heads < num_attention_heads) is not supported")
        if hf_cfg.hidden_act not in ("silu", "relu2"):
            raise ValueError(f"cannot import a {kind} model with hidden_act {hf_cfg.hidden_act!r}; "
                             "supported: silu, relu2")
        if kind == "qwen3" and getattr(hf_cfg, "use_sliding_window", False):
            raise ValueError("cannot import a qwen3 model with sliding-window attention")
        rope = getattr(hf_cfg, "rope_parameters", None) or {}
        values = dict(block_size=hf_cfg.max_position_embeddings, vocab_size=hf_cfg.vocab_size,
                      n_layer=hf_cfg.num_hidden_layers, n_head=hf_cfg.num_attention_heads, n_embd=hf_cfg.hidden_size,
                      ffn_hidden=hf_cfg.intermediate_size, norm="rmsnorm", mlp="swiglu", pos_emb="rope",
                      bias=bool(hf_cfg.attention_bias), norm_eps=hf_cfg.rms_norm_eps,
                      rope_theta=float(rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))),
                      tie_embeddings=tie, dropout=0.0, qk_norm=kind == "qwen3",
                      relu_squared=hf_cfg.hidden_act == "relu2")
    else:
        raise ValueError(f"cannot import a Hugging Face '{kind}' model; supported: gpt2 (GPT2LMHeadModel), "
                         "llama (LlamaForCausalLM), qwen3 (Qwen3ForCausalLM)")
    values.update(overrides)
    return ModelConfig(**values)


def to_hf_state_dict(state: dict, config: ModelConfig) -> dict:
    """Our state dict -> the HF model's (GPT-2: transpose Conv1D weights; both: drop pad rows)."""
    family = hf_family(config)
    out = {}
    for key, value in state.items():
        if key in ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight"):
            value = value[:config.vocab_size]
        if family == "gpt2" and key.endswith(CONV1D_SUFFIXES):
            value = value.t()
        out[key] = value.contiguous()
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(hf_state: dict, config: ModelConfig) -> dict:
    """An HF state dict -> ours for `config` (pads vocabulary rows with zeros up to padded_vocab_size)."""
    family = hf_family(config)
    out = {}
    for key, value in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # HF buffers (causal masks, rope tables), not weights
        if family == "gpt2" and key.endswith(CONV1D_SUFFIXES):
            value = value.t()
        if key in ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight") \
                and config.padded_vocab_size > value.size(0):
            pad = value.new_zeros(config.padded_vocab_size - value.size(0), value.size(1))
            value = torch.cat([value, pad])
        out[key] = value.contiguous()
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_hf(model: GPT, eot_id=None):
    """A transformers model (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM) with this model's weights,
    fp32, eval mode (eot_id: see hf_config)."""
    config = model.config
    hf_model = hf_class(config)(hf_config(config, eot_id))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(state, config), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)
               and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"HF export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def from_hf(hf_model, **overrides) -> GPT:
    """Our GPT with the weights of a GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM."""
    from models.io import load_state

    config = config_from_hf(hf_model.config, **overrides)
    with torch.device("meta"):
        model = GPT(config)
    state = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    load_state(model, from_hf_state_dict(state, config))
    return model.eval()
