"""tools/zero_to_fp32.py on real ZeRO checkpoints: exact equality with DeepSpeed's own consolidation,
the tied head restored, HF export that transformers loads with matching logits, clear errors.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import REPO, run_cli

import models
from tools import zero_to_fp32

ARGS = ["--seq-len", "64", "--micro-batch", "4", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0",
        "--log-every", "1", "--seed", "7", "--global-batch", "8", "--max-steps", "4", "--save-every", "2",
        "--keep-last", "0", "--no-tracking"]


def pretrain(data, out, ranks, *extra):
    run_cli(["pretrain", *ARGS, "--data", str(data), "--out", str(out), *extra], ranks=ranks, timeout=900)
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """GPT-2 tiny (tied embeddings), ZeRO-2 bf16 on 2 ranks: two optimizer shards per checkpoint."""
    return pretrain(data, tmp_path_factory.mktemp("run") / "run", 2, "--model", "tiny", "--ds-config", "zero2_bf16")


def tool(*args):
    result = CliRunner().invoke(zero_to_fp32.main, [str(a) for a in args])
    return result


def test_output_equals_deepspeeds_consolidation_and_keeps_the_tie(run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    result = tool(run, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["checkpoint"].endswith("step_0000004")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_0000004")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(reference) - {"lm_head.weight"}  # the tied head is not stored twice
    for name, tensor in written.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name
    model = models.load(tmp_path / "out")
    assert model.lm_head.weight is model.wte.weight  # tied again (DeepSpeed #1896 / #3824)
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"])
    assert (tmp_path / "out" / "tokenizer_spec.txt").read_text().strip() == "bytes"


def test_tag_and_checkpoint_dir_select_the_same_checkpoint(run, tmp_path):
    assert tool(run, tmp_path / "a", "--tag", "2").exit_code == 0
    assert tool(run / "checkpoints" / "step_0000002", tmp_path / "b").exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_hf_export_loads_in_transformers_with_the_same_logits(run, tmp_path):
    from transformers import AutoModelForCausalLM

    result = tool(run, tmp_path / "hf", "--hf", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["hf_class"] == "GPT2LMHeadModel" and summary["logits_max_abs_diff"] <= 1e-4
    assert "max abs diff" in result.output
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours = models.load(_consolidated(run, tmp_path)).eval()
    idx = torch.randint(0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() < 1e-4


def test_byte_level_hf_export_generates_with_transformers_pipeline(run, tmp_path):
    """The byte-tokenizer export carries a tokenizer transformers loads: the pipeline continues a prompt
    exactly as our greedy `generate` does, and config and tokenizer agree on bos/eos and the length."""
    from pydoc_data.topics import topics

    from transformers import AutoConfig, AutoTokenizer, pipeline

    from trainer.data.tokenizer import get_tokenizer
    from trainer.eval.generate import sample
    from trainer.eval.modelio import load_model

    out = tmp_path / "hf"
    assert tool(run, out, "--hf").exit_code == 0
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = topics["assert"][:2000]
    assert tokenizer.encode(text) == list(text.encode("utf-8"))
    config = AutoConfig.from_pretrained(str(out))
    assert config.bos_token_id == config.eos_token_id == tokenizer.bos_token_id == tokenizer.eos_token_id == 256
    assert tokenizer.model_max_length == config.n_positions == 64
    prompt = "The assert statement"
    generated = pipeline("text-generation", model=str(out))(prompt, max_new_tokens=24, do_sample=False)
    model, spec, _ = load_model(run)
    ours = sample(model, get_tokenizer(spec), prompt, 24, temperature=0)
    assert ours and generated[0]["generated_text"] == prompt + ours


def _consolidated(run, tmp_path):
    out = tmp_path / "consolidated"
    if not out.exists():
        assert tool(run, out).exit_code == 0
    return out


def test_partial_checkpoint_is_refused_in_plain_words(run, tmp_path):
    broken = tmp_path / "checkpoints" / "step_0000004"
    shutil.copytree(run / "checkpoints" / "step_0000004", broken)
    (broken / "COMPLETE").unlink()
    next(broken.glob("*rank_1_*optim_states.pt")).unlink()
    result = tool(broken, tmp_path / "out")
    assert result.exit_code != 0
    assert "saved by 2 ranks, so it needs 2 optimizer shard files" in result.output and "only 1" in result.output
    assert "Traceback" not in result.output
    result = tool(run, tmp_path / "out", "--tag", "99")
    assert result.exit_code != 0 and "checkpoints there: step_0000002, step_0000004" in result.output


@pytest.mark.parametrize("script, extra", [("zero_to_fp32.py", []), ("zero_to_torch.py", ["--dtype", "float32"])])
def test_the_scripts_deepspeed_puts_beside_checkpoints_export_tied_models(run, tmp_path, script, extra):
    """DeepSpeed copies zero_to_fp32.py / zero_to_torch.py into RUN/checkpoints and users run them with
    --safe_serialization, which fails on tied embeddings with DeepSpeed's own ("Some tensors share memory").
    The scripts there run from any directory and write DeepSpeed's consolidated weights, the tie kept."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(run / "checkpoints" / script), str(run / "checkpoints"),
                           str(tmp_path / "out"), "--safe_serialization", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_0000004")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(reference) - {"lm_head.weight"}
    assert all(torch.equal(tensor, reference[name]) for name, tensor in written.items())
    model = models.load(tmp_path / "out")
    assert model.lm_head.weight is model.wte.weight


def test_script_runs_from_the_command_line(run, tmp_path):
    proc = subprocess.run([sys.executable, "tools/zero_to_fp32.py", str(run / "nope"), str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_gpt25_exports_to_llama_with_matching_logits(data, tmp_path):
    run = pretrain(data, tmp_path / "run25", 1, "--model", "gpt25", "--set", "n_layer=2", "--set", "n_head=4",
                   "--set", "n_embd=64", "--set", "block_size=64", "--ds-config", "zero2_fp32")
    result = tool(run, tmp_path / "hf", "--hf", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["hf_class"] == "LlamaForCausalLM" and summary["logits_max_abs_diff"] <= 1e-4
    print("llama export logits max abs diff:", summary["logits_max_abs_diff"])
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert config.bos_token_id == config.eos_token_id == tokenizer.bos_token_id == tokenizer.eos_token_id == 256
    assert tokenizer.model_max_length == config.max_position_embeddings == 64


@pytest.mark.slow
def test_zero0_bf16_exports_the_fp32_master_weights(data, tmp_path):
    """ZeRO-0 bf16 has no ZeRO shards; the fp32 masters sit flat in the optimizer state, not in the module."""
    from safetensors.torch import load_file

    run = pretrain(data, tmp_path / "run0", 1, "--model", "tiny", "--ds-config", "zero0_bf16")
    assert tool(run, tmp_path / "out").exit_code == 0
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    states = run / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt"
    module = torch.load(states, weights_only=False)["module"]
    assert all(torch.equal(written[k].bfloat16(), module[k]) for k in written)  # the masters round to the weights
    assert any(not torch.equal(written[k], module[k].float()) for k in written)  # and carry more than bf16
    model = models.load(tmp_path / "out")
    assert model.lm_head.weight is model.wte.weight
