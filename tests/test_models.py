"""The model a user trains: exact GPT-2 sizes, GPT-2 initialisation, causality, checkpointing, files."""
import ast
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models import GPT, get_config

GPT2_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
               "gpt2-xl": 1_557_611_200}
FROZEN = Path(__file__).resolve().parent / "golden" / "state_dict_keys.json"


def meta_model(name, **overrides) -> GPT:
    with torch.device("meta"):
        return GPT(get_config(name, **overrides))


@pytest.mark.parametrize("name", list(GPT2_COUNTS))
def test_gpt2_parameter_counts_are_exact(name):
    assert meta_model(name).num_params() == GPT2_COUNTS[name]


def test_gpt25_is_gpt2_sized():
    # 12 x 768 with SwiGLU 2048 and no biases lands within 1% of GPT-2 124M.
    assert abs(meta_model("gpt25").num_params() - GPT2_COUNTS["gpt2"]) / GPT2_COUNTS["gpt2"] < 0.01
    assert get_config("gpt25").ffn_hidden == 2048 and get_config("gpt25-medium").ffn_hidden == 2816


def test_state_dict_keys_are_frozen():
    """State-dict keys are a public contract (checkpoints, HF conversion): changing them must be deliberate."""
    keys = {name: sorted(meta_model(name).state_dict()) for name in models.list_configs()}
    layer0 = {name: [k for k in ks if ".0." in k or not any(c.isdigit() for c in k)] for name, ks in keys.items()}
    counts = {name: len(ks) for name, ks in keys.items()}
    frozen = json.loads(FROZEN.read_text())
    assert frozen["layer0"] == layer0
    assert frozen["counts"] == counts


def test_unknown_preset_and_field_list_the_valid_ones():
    with pytest.raises(ValueError, match="gpt2-medium"):
        get_config("gpt3")
    with pytest.raises(ValueError, match="n_layer"):
        get_config("gpt2", n_layers=4)
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", n_head=5)


@pytest.mark.parametrize("overrides, message", [
    ({"rotary_dim": 7}, "rotary_dim"), ({"rotary_dim": 32}, "head dim 16"),
    ({"norm": "batchnorm"}, "layernorm, rmsnorm"), ({"mlp": "relu"}, "gelu, swiglu"),
    ({"pos_emb": "alibi"}, "learned, rope"), ({"padded_vocab_size": 500}, "padded_vocab_size")])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **overrides)


def test_config_round_trips_through_a_dict():
    import dataclasses

    cfg = get_config("gpt25", n_layer=3)
    assert models.ModelConfig(**dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("overrides", [{}, {"rotary_dim": 8},
                                       {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False}])
def test_causal(overrides):
    torch.manual_seed(0)
    model = GPT(get_config("tiny", **overrides)).eval()
    idx = torch.randint(0, 512, (1, 20))
    changed = idx.clone()
    changed[0, 11] = (idx[0, 11] + 1) % 512
    a, b = model(idx), model(changed)
    assert torch.equal(a[0, :11], b[0, :11])
    assert not torch.allclose(a[0, 11:], b[0, 11:])


def test_init_is_gpt2s_and_deterministic():
    torch.manual_seed(0)
    model = GPT(get_config("gpt2-mini", n_layer=8))
    torch.manual_seed(0)
    again = GPT(get_config("gpt2-mini", n_layer=8))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert block.attn.c_attn.bias.abs().max() == 0 and torch.all(block.ln_1.weight == 1)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt25_init_scales_its_residual_projections():
    torch.manual_seed(0)
    block = GPT(get_config("gpt25", n_layer=8, n_embd=256, n_head=4)).model.layers[0]
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (block.self_attn.o_proj, block.mlp.down_proj):
        assert proj.weight.std().item() == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert torch.all(block.input_layernorm.weight == 1)


def test_padded_vocab_is_never_returned():
    model = GPT(get_config("tiny", vocab_size=500, padded_vocab_size=512))
    assert model.lm_head.weight.shape[0] == 512
    assert model(torch.randint(0, 500, (2, 8))).shape == (2, 8, 500)


@pytest.mark.parametrize("overrides", [{}, {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False}])
def test_activation_checkpointing_gives_the_same_gradients(overrides):
    torch.manual_seed(0)
    model = GPT(get_config("tiny", **overrides))
    idx = torch.randint(0, 512, (2, 16))
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        model(idx).float().pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


@pytest.mark.parametrize("overrides", [{}, {"mlp": "swiglu", "norm": "rmsnorm", "pos_emb": "rope", "bias": False}])
def test_flops_per_token_matches_torch_flop_counter(overrides):
    """The MFU numerator against torch's own count of a real forward + backward (matmuls and attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = GPT(get_config("tiny", n_layer=2, n_head=4, n_embd=256, block_size=64, **overrides))
    x = torch.randint(0, 512, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as countable bmm
        model(x, x).backward()
    counted = counter.get_total_flops() / x.numel()
    # PaLM's 6N also counts biases and norm gains as if they were matmul weights: a fraction of a percent here.
    assert model.flops_per_token(64) == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("overrides", [{}, {"rotary_dim": 8}, {"dropout": 0.0, "norm": "rmsnorm", "mlp": "swiglu",
                                                               "pos_emb": "rope", "bias": False}])
def test_kv_cache_greedy_decoding_matches_full_recompute(overrides):
    torch.manual_seed(0)
    model = GPT(get_config("tiny", **overrides)).eval()
    prompt = torch.randint(0, 512, (2, 7))
    full = prompt.clone()
    cache = model.new_kv_cache(2, 40)
    logits = model(prompt, kv_cache=cache)
    cached = prompt.clone()
    for _ in range(20):
        cached = torch.cat([cached, logits[:, -1:].argmax(-1)], dim=1)
        logits = model(cached[:, -1:], kv_cache=cache)
        full = torch.cat([full, model(full)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, full)


def test_kv_cache_refuses_to_overflow():
    model = GPT(get_config("tiny")).eval()
    cache = model.new_kv_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    assert cache.length == 6
    with pytest.raises(ValueError, match="holds 8"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(get_config("tiny", rotary_dim=8)).eval()
    models.save(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    loaded = models.load(tmp_path).eval()
    idx = torch.randint(0, 512, (1, 12))
    assert torch.equal(model(idx), loaded(idx))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.load(tmp_path)


def test_models_package_imports_torch_only():
    """models/ is single-device PyTorch: no deepspeed, torch.distributed, .cuda() or file I/O outside io.py."""
    root = Path(models.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    top = name.split(".")[0]
                    assert top in {"torch", "models", "math", "dataclasses", "typing", "json", "pathlib",
                                   "transformers", "safetensors", ""}, f"{path.name} imports {name}"
                    assert not name.startswith("torch.distributed"), f"{path.name} imports {name}"
                    if top in {"transformers", "safetensors"}:  # only lazily, inside functions
                        assert node.col_offset > 0, f"{path.name} imports {name} at module level"
            if isinstance(node, ast.Attribute) and node.attr in {"cuda", "autocast"}:
                raise AssertionError(f"{path.name} uses .{node.attr}")
            if isinstance(node, ast.Name) and node.id == "open" and path.name != "io.py":
                raise AssertionError(f"{path.name} does file I/O")


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(models.list_configs()),
       pos_emb=st.sampled_from([None, "learned", "rope"]), mlp=st.sampled_from([None, "gelu", "swiglu"]),
       shape=st.sampled_from([None, (4, 64), (8, 256), (2, 96)]), vocab=st.sampled_from([None, 257, 50257]))
def test_derived_fields_follow_the_fields_they_derive_from(name, pos_emb, mlp, shape, vocab):
    """Overriding a field never leaves a value the preset derived from the old one (rotary_dim kept at the
    head size after `--set pos_emb=learned` meant learned positions and full RoPE at once)."""
    overrides = {k: v for k, v in (("pos_emb", pos_emb), ("mlp", mlp), ("vocab_size", vocab)) if v is not None}
    if shape:
        overrides.update(n_head=shape[0], n_embd=shape[1])
    cfg = get_config(name, **overrides)
    head_dim = cfg.n_embd // cfg.n_head
    assert cfg.rotary_dim == (head_dim if cfg.pos_emb == "rope" else 0)
    hidden = 256 * -(-int(8 * cfg.n_embd / 3) // 256)  # Llama's 8/3 width rounded up to 256
    assert cfg.ffn_hidden == (4 * cfg.n_embd if cfg.mlp == "gelu" else hidden)
    assert cfg.padded_vocab_size == cfg.vocab_size


def test_learned_positions_on_a_gpt25_preset_turn_rope_off():
    cfg = get_config("gpt25", pos_emb="learned")
    assert cfg.rotary_dim == 0 and cfg.pos_emb == "learned"
    with torch.device("meta"):
        model = GPT(cfg)
    assert any(k.endswith("wpe.weight") for k in model.state_dict())  # a learned position table
    assert get_config("gpt25", pos_emb="learned", rotary_dim=32).rotary_dim == 32  # chosen, not derived: kept
