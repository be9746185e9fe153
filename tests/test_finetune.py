"""`finetune` end to end: a tiny GPT-2 (OpenAI's vocabulary, random weights) saved as a Hugging Face
directory is instruction-tuned on chat data made from the pydoc corpus ("Explain the topic X" -> the
topic's first paragraph) by 2 DeepSpeed ranks, then exported and used through transformers.

Oracles: transformers' GPT-2 for the loss of the first global batch (token-weighted over the trained
targets of all ranks and micro-batches) and for the loss on the training answers before and after,
computed from transformers' own chat-template rendering and tokenizer; `pipeline("text-generation")`
with chat messages against our `generate --chat`; the uninterrupted run for resume. Bad input runs in
process against a trap on the DeepSpeed engine: one `Error:` line, nothing written.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import run_cli, training_records

import models
from trainer.cli import cli

STEPS = 12
ARGS = ["--max-seq-len", "128", "--micro-batch", "2", "--global-batch", "8", "--max-steps", str(STEPS), "--lr", "3e-3",
        "--min-lr", "3e-4", "--warmup-steps", "2", "--eval-every", "6", "--eval-batches", "2", "--save-every", "6",
        "--keep-last", "0", "--log-every", "1", "--seed", "3", "--val-fraction", "0.1", "--ds-config", "zero2_fp32"]


def finetune(*args, ranks=2, check=True):
    return run_cli(["finetune", *args], ranks=ranks, check=check)


def train_records(run: Path) -> list[dict]:
    """One training record per step (a resumed run appends; the last record of a step wins)."""
    last = {r["step"]: r for r in training_records(run)}
    return [last[s] for s in sorted(last)]


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    from tools.pydoc_sft import alpaca_records, chat_records, write_jsonl

    root = tmp_path_factory.mktemp("sft")
    return {"chat": str(write_jsonl(root / "chat.jsonl", chat_records())),
            "alpaca": str(write_jsonl(root / "alpaca.jsonl", alpaca_records()))}


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    """A Hugging Face GPT-2 directory (model + tokenizer files), what `--init-from gpt2` would be at tiny size."""
    from trainer.data.tokenizer import get_tokenizer

    out = tmp_path_factory.mktemp("base") / "gpt2-tiny"
    torch.manual_seed(0)
    model = models.GPT(models.ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=50257))
    models.hf.to_hf(model, eot_id=50256).save_pretrained(out)
    get_tokenizer("gpt2").save_hf(out, model_max_length=128)
    return out


@pytest.fixture(scope="module")
def run(gpt2_base, sft_files, tmp_path_factory):
    """The uninterrupted run: 2 ranks (deepspeed launcher), micro-batch 2 x accumulation 2, checkpoints at 6 and 12."""
    out = tmp_path_factory.mktemp("ft") / "run"
    proc = finetune("--init-from", gpt2_base, "--data", sft_files["chat"], "--out", out, *ARGS, "--json")
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    assert result["step"] == STEPS and result["stopped"] == "finished", result
    return out, result


def hf_reply_loss(model, tokenizer, conversations) -> float:
    """Mean NLL of the reply tokens (and end-of-text) after transformers' chat-template prompt."""
    total, count = 0.0, 0
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[len(prompt) - 1:]
        total, count = total + nll.sum().item(), count + len(nll)
    return total / count


# ---- end to end ---------------------------------------------------------------------------------

def test_the_run_logs_trained_tokens_val_loss_and_records_its_data(run):
    out, result = run
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(0 < r["trained_tokens"] < r["tokens"] for r in records)
    assert [r["trained_tokens"] for r in records] == sorted(r["trained_tokens"] for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, [r["loss"] for r in records]
    assert result["trained_tokens"] == records[-1]["trained_tokens"]
    assert (result["records"], result["val_examples"], result["train_examples"] + result["val_examples"]) == (79, 8, 79)
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [r["step"] for r in val] == [6, 12] and all(math.isfinite(r["val_loss"]) for r in val)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    meta = json.loads((out / "sft" / "meta.json").read_text())
    assert meta["identity"]["template"]["name"] == "plain" and meta["identity"]["tokenizer"] == "gpt2"
    assert meta["stats"]["format"] == "chat"


def test_first_step_loss_is_the_mean_over_every_trained_target_of_the_global_batch(run, gpt2_base):
    """2 ranks x 2 micro-batches hold different numbers of trained targets; the step's loss (and gradient) is
    the mean over all of them, as one forward over the whole batch computes it."""
    from transformers import AutoModelForCausalLM

    from models.loss import IGNORE_INDEX
    from trainer.sft import store
    from trainer.sft.stream import SFTTrainStream

    out, _ = run
    train, _, _ = store.read(out / "sft")
    x, y = SFTTrainStream(train, 128, 8, 3, True, 50256).local_batch(0, 0, 1)
    per_rank = [(y[r * 4:(r + 1) * 4] != IGNORE_INDEX).sum().item() for r in range(2)]
    assert per_rank[0] != per_rank[1]  # otherwise a mean of means would give the same number
    base = AutoModelForCausalLM.from_pretrained(str(gpt2_base), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(base(x).logits.flatten(0, 1), y.flatten(),
                                                     ignore_index=IGNORE_INDEX)
    assert train_records(out)[0]["loss"] == pytest.approx(expected.item(), abs=1e-4)


def test_the_finetuned_export_answers_training_prompts_better_and_chats_in_a_pipeline(run, gpt2_base, sft_files,
                                                                                       tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from tools.zero_to_fp32 import export
    from trainer.sft.records import read_conversations
    from trainer.sft.template import BUILTIN

    out, _ = run
    summary = export(out, tmp_path / "hf", hf=True, log=lambda m: None)
    assert summary["chat_template"] == "plain" and summary["logits_max_abs_diff"] <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    _, conversations = read_conversations(sft_files["chat"])
    sample = conversations[:20]
    before = hf_reply_loss(AutoModelForCausalLM.from_pretrained(str(gpt2_base)).eval(), tokenizer, sample)
    after = hf_reply_loss(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval(), tokenizer, sample)
    print(f"reply loss on 20 training prompts: before {before:.3f}, after {after:.3f} nats/token")
    assert after < before - 1.0  # e-fold lower perplexity at least

    # pipeline() with chat messages builds the prompt our template builds, and continues it as we do.
    messages = [{"role": "user", "content": "Explain the topic assert"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|user|>\nExplain the topic assert\n<|assistant|>\n" == BUILTIN["plain"].render(messages, True)
    chat = pipeline("text-generation", model=str(tmp_path / "hf"))
    reply = chat(messages, max_new_tokens=24, do_sample=False)[0]["generated_text"][-1]
    result = CliRunner().invoke(cli, ["generate", "--model-path", str(out), "--chat", "--prompt",
                                      messages[0]["content"],
                                      "--temperature", "0", "--max-new-tokens", "24", "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout.strip().splitlines()[-1])["samples"][0]
    assert reply["role"] == "assistant" and ours and reply["content"].startswith(ours)
    rest = reply["content"][len(ours):]
    assert rest == "" or rest.lstrip().startswith("<|end|>"), rest  # ours stops at the end marker, HF at end-of-text
    # The export also carries the template for our own commands.
    result = CliRunner().invoke(cli, ["generate", "--model-path", str(tmp_path / "hf"), "--chat", "--prompt",
                                      messages[0]["content"], "--temperature", "0", "--max-new-tokens", "24", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout.strip().splitlines()[-1])["samples"][0] == ours


@pytest.mark.extended
def test_a_paused_run_resumes_bitwise_from_its_own_examples(run, gpt2_base, sft_files, tmp_path):
    """The run as a pause at step 6 would have left it; rerunning the command reads its examples back from
    RUN/sft (no tokenizing) and continues with the uninterrupted run's loss, lr, grad norm and counts."""
    import shutil

    out, _ = run
    paused = tmp_path / "paused"
    shutil.copytree(out, paused)
    shutil.rmtree(paused / "checkpoints" / "step_0000012")
    (paused / "checkpoints" / "latest").write_text("step_0000006")
    (paused / "metrics.jsonl").unlink()
    proc = finetune("--init-from", gpt2_base, "--data", sft_files["chat"], "--out", paused, *ARGS)
    assert "tokenizing" not in proc.stdout and "at step 6" in proc.stdout
    assert [r["step"] for r in train_records(paused)] == list(range(7, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "trained_tokens"):
        assert [r[key] for r in train_records(paused)] == [r[key] for r in train_records(out)][6:], key  # bitwise


# ---- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bytes_base(tmp_path_factory):
    """A consolidated byte-level model (block 128) that records its tokenizer, and one that records none."""
    from trainer.eval.modelio import write_tokenizer_spec

    root = tmp_path_factory.mktemp("bytes")
    torch.manual_seed(0)
    model = models.GPT(models.get_config("tiny", vocab_size=257, block_size=128))
    models.save(model, root / "base")
    write_tokenizer_spec(root / "base", "bytes")
    models.save(model, root / "no-tokenizer")
    return root


def _files(where: Path) -> dict:
    return {p: p.read_bytes() for p in where.rglob("*") if p.is_file()}


def _jsonl(where: Path, name: str, records: list) -> str:
    path = where / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _gpt2_examples(where: Path, sft_files) -> str:
    """A directory of examples tokenized with GPT-2's tokenizer (as a run's RUN/sft)."""
    from trainer.data.tokenizer import get_tokenizer
    from trainer.sft import store
    from trainer.sft.examples import build
    from trainer.sft.records import read_conversations
    from trainer.sft.template import BUILTIN

    _, conversations = read_conversations(sft_files["chat"])
    train, val, stats = build(conversations, BUILTIN["plain"], get_tokenizer("gpt2"), 128, 0.1)
    identity = {"source": sft_files["chat"], "format": "auto", "template": BUILTIN["plain"].to_dict(),
                "tokenizer": "gpt2", "max_seq_len": 128, "val_fraction": 0.1, "fingerprint": None}
    store.write(where / "gpt2-examples", train, val, identity, {**stats, "format": "chat"})
    return str(where / "gpt2-examples")


GOOD = {"instruction": "Say hi", "output": "hi"}
BAD_INPUT = [
    ("no-init-from", lambda t, b, s: ["--data", s["alpaca"]], "finetune needs --init-from"),
    ("no-data", lambda t, b, s: ["--init-from", b / "base"], "finetune needs --data"),
    ("missing-field", lambda t, b, s: ["--init-from", b / "base", "--data",
                                       _jsonl(t, "d.jsonl", [GOOD, GOOD, {"instruction": "x"}])],
     "d.jsonl line 3 has no 'output'"),
    ("empty-response", lambda t, b, s: ["--init-from", b / "base", "--data",
                                        _jsonl(t, "d.jsonl", [GOOD, {"instruction": "x", "output": " "}])],
     "d.jsonl line 2: the response ('output') is empty"),
    ("template-does-not-fit", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--max-seq-len", "30"],
     "template 'plain' takes 34 tokens for its markers"),
    ("longer-than-block", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--max-seq-len", "256"],
     "--max-seq-len 256 is longer than the base model's context (block_size 128)"),
    ("data-of-another-tokenizer", lambda t, b, s: ["--init-from", b / "base", "--data", _gpt2_examples(t, s)],
     "was tokenized with gpt2, but the base model"),
    ("tokenizer-not-the-models", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"],
                                                  "--tokenizer", "gpt2"],
     "--tokenizer gpt2 differs from the tokenizer the base model"),
    ("tokenizer-not-the-vocabulary", lambda t, b, s: ["--init-from", b / "no-tokenizer", "--data", s["alpaca"],
                                                       "--tokenizer", "gpt2"],
     "tokenizer gpt2 has 50,257 tokens but the base"),
    ("no-recorded-tokenizer", lambda t, b, s: ["--init-from", b / "no-tokenizer", "--data", s["alpaca"]],
     "records no tokenizer; pass --tokenizer"),
    ("unknown-template", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--template", "zephyr"],
     "--template zephyr: not a built-in template"),
    ("unknown-format", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--format", "dolly"],
     "'dolly' is not one of"),
    ("forced-format", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--format", "chat"],
     "alpaca.jsonl line 1 has no 'messages'"),
    ("missing-file", lambda t, b, s: ["--init-from", b / "base", "--data", t / "none.jsonl"], "no such file"),
    ("text-file", lambda t, b, s: ["--init-from", b / "base", "--data", _jsonl(t, "d.txt", [GOOD])],
     "records are read from .jsonl, .jsonl.gz or .parquet files"),
    ("no-val-but-eval", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--val-fraction", "0"],
     "--val-fraction 0 holds out nothing"),
    ("val-too-small", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--val-fraction", "0.01",
                                       "--micro-batch", "4"], "less than one validation batch of 4"),
    ("missing-base", lambda t, b, s: ["--init-from", t / "nope", "--data", s["alpaca"]], "nope: no such directory"),
    ("architecture-set", lambda t, b, s: ["--init-from", b / "base", "--data", s["alpaca"], "--set", "n_layer=3",
                                           "--micro-batch", "2"],
     "architecture differs"),
]


@pytest.mark.parametrize("case, build, fragment", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_finetune_bad_input(case, build, fragment, bytes_base, sft_files, no_engine, tmp_path):
    args = [str(a) for a in build(tmp_path, bytes_base, sft_files)]
    before = _files(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--out", str(out), "--ds-config", "zero2_fp32", *args])
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() and _files(tmp_path) == before


def test_resuming_with_other_data_settings_is_refused(run, gpt2_base, sft_files, no_engine):
    out, _ = run
    before = _files(out)
    result = CliRunner().invoke(cli, ["finetune", "--init-from", str(gpt2_base), "--data", sft_files["chat"],
                                      "--out", str(out), *ARGS, "--template", "chatml"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert "holds the examples this run was trained on, and they were made otherwise: template plain (now chatml)" \
        in errors[0]
    assert _files(out) == before


def test_generate_chat_needs_a_template_and_takes_one_by_name(bytes_base, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    base = str(bytes_base / "base")
    common = ["generate", "--model-path", base, "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0"]
    for extra, fragment in ((["--chat"], "records no chat template (it was not fine-tuned with `finetune`); name one "
                                         "with --template plain"),
                            (["--system", "Be brief."], "--system is a chat message: pass --chat"),
                            (["--template", "nope"], "--template nope: not a built-in template")):
        result = CliRunner().invoke(cli, [*common, *extra])
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code != 0 and len(errors) == 1 and fragment in errors[0], result.output
    result = CliRunner().invoke(cli, [*common, "--template", "chatml", "--system", "Be brief.", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["template"] == "chatml"
