"""Our models and Hugging Face's agree: same logits both ways through the real converters."""
import helpers
import pytest
import torch

from models import GPT, get_config, hf

GPT25 = dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False)


def random_model(**overrides) -> GPT:
    return helpers.random_model(vocab_size=512, **overrides)


@pytest.mark.parametrize("overrides, hf_class", [({}, "GPT2LMHeadModel"), (GPT25, "LlamaForCausalLM"),
                                                 ({**GPT25, "tie_embeddings": False}, "LlamaForCausalLM"),
                                                 ({"padded_vocab_size": 576}, "GPT2LMHeadModel"),
                                                 ({**GPT25, "rope_theta": 5e5, "norm_eps": 1e-6}, "LlamaForCausalLM"),
                                                 ({"relu_squared": True}, "GPT2LMHeadModel"),
                                                 ({**GPT25, "relu_squared": True}, "LlamaForCausalLM"),
                                                 ({**GPT25, "qk_norm": True, "tie_embeddings": False},
                                                  "Qwen3ForCausalLM"),
                                                 ({**GPT25, "qk_norm": True, "relu_squared": True},
                                                  "Qwen3ForCausalLM")])
def test_ours_to_hf_and_back(overrides, hf_class):
    model = random_model(**overrides)
    idx = torch.randint(0, 512, (2, 40))
    hf_model = hf.to_hf(model)
    assert type(hf_model).__name__ == hf_class
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        back = hf.from_hf(hf_model, padded_vocab_size=model.config.padded_vocab_size)
        assert (back(idx) - ours).abs().max().item() <= 1e-4
    assert hf_model.get_input_embeddings().weight.shape[0] == model.config.vocab_size  # pad rows dropped
    assert back.config == model.config  # every field survives the trip (theta, eps, ffn_hidden, tying)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_gpt2_to_ours(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf_model = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, vocab_size=300,
                                          resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                          eos_token_id=0, attn_implementation=attn)).eval()
    model = hf.from_hf(hf_model)
    idx = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        assert (model(idx) - hf_model(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_llama_to_ours(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, attn_implementation=attn)).eval()
    model = hf.from_hf(hf_model, padded_vocab_size=320)
    assert (model.config.rope_theta, model.config.norm_eps, model.config.ffn_hidden) == (50000.0, 1e-6, 176)
    idx = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape[-1] == 300 and (logits - hf_model(idx).logits).abs().max().item() <= 1e-4


def test_export_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model(**GPT25)
    hf.to_hf(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (loaded(idx).logits - model(idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides, field", [({"rotary_dim": 8}, "rotary_dim"), ({"norm": "rmsnorm"}, "norm"),
                                              ({**GPT25, "pos_emb": "learned", "rotary_dim": 0}, "pos_emb"),
                                              ({**GPT25, "logit_softcap": 15.0}, "logit_softcap"),
                                              ({"qk_norm": True}, "GPT2LMHeadModel: qk_norm"),
                                              ({**GPT25, "qk_norm": True, "bias": True}, "Qwen3ForCausalLM: bias")])
def test_unexportable_combinations_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        hf.hf_config(get_config("tiny", **overrides))


def test_every_preset_exports():
    """Each preset, the speedrun one included, has a transformers class (tiny-size parity is tested above)."""
    import models

    families = {name: hf.hf_family(get_config(name)) for name in models.list_configs()}
    assert families["gpt25-speedrun"] == "qwen3" and families["gpt25"] == "llama" and families["gpt2"] == "gpt2"
    assert set(families.values()) == {"gpt2", "llama", "qwen3"}
