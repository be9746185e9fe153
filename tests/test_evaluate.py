"""eval-ppl and model loading: parity with an independent transformers computation (the HF
perplexity guide's loop), window arithmetic, batch-size invariance, every --model-path form
(consolidated dir, HF dir, run dir, checkpoint dir and tag, read straight from ZeRO files), and
one-line errors for bad input."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import equal_state, random_model, run_cli, single_process_env

import models
from tools.pydoc_tasks import write_rolling_task
from trainer.cli import cli
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import UserError
from trainer.eval.evaluate import PplConfig, perplexity, run_ppl, sliding_windows
from trainer.eval.modelio import guess_tokenizer_spec, load_model, read_tokenizer_spec, write_tokenizer_spec

REPO = Path(__file__).resolve().parent.parent


def pydoc_text(chars: int = 4000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = random_model()
    models.save(model, root / "consolidated")
    write_tokenizer_spec(root / "consolidated", "bytes")
    hf_dir = root / "hf"
    models.hf.to_hf(model).save_pretrained(hf_dir)
    write_tokenizer_spec(hf_dir, "bytes")
    get_tokenizer("bytes").save_hf(hf_dir, model.config.block_size)
    text = root / "text.txt"
    text.write_text(pydoc_text())
    return {"root": root, "model": model, "consolidated": root / "consolidated", "hf": hf_dir, "text": text}


def lm_eval_hf(hf_dir, max_length: int):
    """lm-evaluation-harness's own Hugging Face model (`lm_eval --model hf`) on an export, fp32 on CPU."""
    from lm_eval.models.huggingface import HFLM

    with single_process_env():
        return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, max_length=max_length, dtype="float32")


@pytest.mark.parametrize("context, stride", [(64, 64), (64, 24), (48, 40), (20, 3)])
def test_eval_ppl_equals_lm_eval_rolling_windows(files, context, stride):
    """eval-ppl's total NLL is lm-eval's rolling loglikelihood: windows from lm-eval's own
    get_rolling_token_windows (context_len = context - stride + 1, so each window predicts `stride` new
    tokens; the first token is conditioned on end-of-text; every window is as long as the context
    allows), scored by lm-eval's HF model on our export."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = lm_eval_hf(files["hf"], context)
    tokens = lm.tok_encode(files["text"].read_text())
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        tokens, prefix_token=lm.prefix_token_id, max_seq_len=context, context_len=context - stride + 1)]
    scores = lm._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
    expected = -sum(logprob for logprob, _ in scores)
    for path in (files["consolidated"], files["hf"]):
        result = run_ppl(PplConfig(model_path=str(path), text_file=str(files["text"]), context=context,
                                   stride=stride, batch_size=4, progress=False))
        assert result["tokens"] == len(tokens)  # every token, the first one included
        assert result["nll"] * result["tokens"] == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_and_word_ppl_equal_lm_eval_at_stride_equal_context(files, tmp_path):
    """The reported symptom: with --stride = --context, bits/byte and word perplexity are lm-eval's
    (`lm_eval --model hf` with a loglikelihood_rolling task over the same text)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    text = files["text"].read_text()
    write_rolling_task(tmp_path, "pydoc_text", [text])
    theirs = lm_eval.simple_evaluate(model=lm_eval_hf(files["hf"], 64), tasks=["pydoc_text"],
                                     task_manager=TaskManager(include_path=str(tmp_path)))["results"]["pydoc_text"]
    ours = run_ppl(PplConfig(model_path=str(files["consolidated"]), text_file=str(files["text"]), context=64,
                             stride=64, word_level=True, progress=False))
    assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte,none"], rel=1e-5)
    assert ours["word_ppl"] == pytest.approx(theirs["word_perplexity,none"], rel=1e-5)


def test_windows_score_every_token_once_with_most_context():
    """Over a stream whose token 0 is the end-of-text prefix: tokens 1..n-1 are each scored once, every window
    feeds at most `context` tokens and as many as the stream allows, and a later window's first scored token
    sees at least context - stride + 1 tokens."""
    for n, context, stride in [(1000, 64, 64), (1000, 64, 1), (1001, 64, 24), (65, 64, 32), (66, 64, 32),
                               (2, 64, 16), (64, 64, 63), (200, 1, 1)]:
        scored = []
        for i, (begin, end, first) in enumerate(sliding_windows(n, context, stride)):
            assert end - begin - 1 == min(context, n - 1) and begin < first < end
            scored.extend(range(first, end))
            if i:
                assert end - first <= stride and first - begin >= context - stride + 1
        assert scored == list(range(1, n))


def test_result_does_not_depend_on_batch_size(files):
    tokens = list(files["text"].read_text().encode("utf-8"))
    results = [perplexity(files["model"], tokens, 64, 24, batch_size=b) for b in (1, 5, 64)]
    assert len({r["tokens"] for r in results}) == 1
    for r in results[1:]:
        assert r["nll"] == pytest.approx(results[0]["nll"], rel=1e-6)


def test_bits_per_byte_and_word_level(files):
    text = files["text"].read_text()
    result = run_ppl(PplConfig(model_path=str(files["consolidated"]), text_file=str(files["text"]), context=64,
                               stride=32, word_level=True, progress=False))
    total = result["nll"] * result["tokens"]
    assert result["bytes"] == len(text.encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text.encode("utf-8")), rel=1e-12)
    assert result["words"] == len(text.split())
    assert result["word_ppl"] == pytest.approx(math.exp(total / len(text.split())), rel=1e-12)


def byte_dataset(data: Path, text: str) -> tuple[list, list]:
    """A bytes-tokenized dataset dir whose val shard is `text`'s paragraphs: (tokens, documents)."""
    from trainer.data.shards import write_shard

    data.mkdir()
    docs = [list(d.encode("utf-8")) for d in text.split("\n\n") if d]
    tokens = [t for d in docs for t in (*d, 256)]
    write_shard(data / "train_000000.bin", tokens, vocab_size=257)
    write_shard(data / "val_000000.bin", tokens, vocab_size=257)
    (data / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 257, "eot_id": 256}))
    return tokens, docs


def test_eval_ppl_on_dataset_shards(files, tmp_path):
    data = tmp_path / "data"
    tokens, docs = byte_dataset(data, files["text"].read_text())
    result = run_ppl(PplConfig(model_path=str(files["consolidated"]), data=str(data), context=64, stride=64,
                               progress=False))
    direct = perplexity(files["model"], tokens, 64, 64, prefix=256)  # the shard starts with a document's text
    assert result["tokens"] == direct["tokens"] == len(tokens)
    assert result["nll"] == pytest.approx(direct["nll"], rel=1e-9)
    assert result["bytes"] == sum(len(d) for d in docs)  # end-of-text ids are not text


def test_hf_dataset_from_a_local_directory(files, tmp_path):
    import datasets

    lines = files["text"].read_text().split("\n\n")[:20]
    datasets.Dataset.from_dict({"text": lines}).to_parquet(str(tmp_path / "test.parquet"))
    result = run_ppl(PplConfig(model_path=str(files["consolidated"]), hf_dataset=str(tmp_path),
                               context=64, stride=32, progress=False))
    joined = "\n\n".join(lines)  # the HF guide's recipe
    direct = perplexity(files["model"], list(joined.encode("utf-8")), 64, 32, prefix=256)
    assert result["tokens"] == direct["tokens"] and result["nll"] == pytest.approx(direct["nll"], rel=1e-9)


def test_cli_json_is_the_last_line(files):
    out = CliRunner().invoke(cli, ["eval-ppl", "--model-path", str(files["consolidated"]), "--text-file",
                                   str(files["text"]), "--context", "64", "--stride", "64", "--no-progress", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output.strip().splitlines()[-1])
    assert {"ppl", "nll", "tokens", "bits_per_byte"} <= set(result)


# ---- bad input: one line, no traceback ------------------------------------------------------------

def cli_error(args) -> str:
    out = CliRunner().invoke(cli, args)
    assert out.exit_code != 0 and "Traceback" not in out.output, out.output
    assert isinstance(out.exception, SystemExit), repr(out.exception)
    return out.output


def test_bad_inputs_give_clear_errors(files, tmp_path):
    model, text = str(files["consolidated"]), str(files["text"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "no such directory" in cli_error(["eval-ppl", "--model-path", str(tmp_path / "nope"), "--text-file", text])
    assert "no such file" in cli_error(["eval-ppl", "--model-path", model, "--text-file", str(tmp_path / "x.txt")])
    assert "empty" in cli_error(["eval-ppl", "--model-path", model, "--text-file", str(empty)])
    assert "larger than the model's block size 64" in cli_error(
        ["eval-ppl", "--model-path", model, "--text-file", text, "--context", "65"])
    assert "--stride 80 must be between 1 and --context 64" in cli_error(
        ["eval-ppl", "--model-path", model, "--text-file", text, "--context", "64", "--stride", "80"])
    assert "exactly one of" in cli_error(["eval-ppl", "--model-path", model, "--text-file", text, "--data", text])
    assert "not a run directory" in cli_error(["eval-ppl", "--model-path", str(tmp_path), "--text-file", text])


def test_missing_tokenizer_is_explained(files, tmp_path):
    bare = tmp_path / "bare"
    models.save(files["model"], bare)
    with pytest.raises(UserError, match="pass --tokenizer"):
        run_ppl(PplConfig(model_path=str(bare), text_file=str(files["text"]), progress=False))
    result = run_ppl(PplConfig(model_path=str(bare), text_file=str(files["text"]), tokenizer="bytes", progress=False,
                               max_tokens=200))
    assert result["tokens"] == 200


# ---- tokenizer spec beside model files -----------------------------------------------------------

def test_tokenizer_spec_round_trip(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models

    write_tokenizer_spec(tmp_path / "a", "gpt2")
    assert read_tokenizer_spec(tmp_path / "a") == "gpt2"
    tok = Tokenizer(tok_models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
    tok.save(str(tmp_path / "tok.json"))
    write_tokenizer_spec(tmp_path / "b", f"hf:{tmp_path / 'tok.json'}")
    (tmp_path / "tok.json").unlink()  # the directory carries its own copy
    spec = read_tokenizer_spec(tmp_path / "b")
    assert spec == f"hf:{(tmp_path / 'b' / 'tokenizer.json').resolve()}" and Path(spec[3:]).is_file()
    assert read_tokenizer_spec(tmp_path) is None


def test_openai_gpt2_tokenizer_files_are_recognised(tmp_path):
    from trainer.data.tokenizer import get_tokenizer

    get_tokenizer("gpt2").save_hf(tmp_path, 1024)  # vocab.json + merges.txt, as in OpenAI's gpt2 on the hub
    assert guess_tokenizer_spec(tmp_path) == "gpt2"


# ---- DeepSpeed checkpoints, read straight from the ZeRO files ------------------------------------

MAKE_CHECKPOINT = r"""
import dataclasses, sys
import torch
import models
from trainer import checkpoint
from trainer.engine import build as engine
out, stage = sys.argv[1], int(sys.argv[2])
engine.init_distributed()
torch.manual_seed(0)
cfg = models.get_config("tiny", vocab_size=257, padded_vocab_size=320)
model = models.GPT(cfg)
# torch's AdamW (torch_adam) avoids JIT-building DeepSpeed's fused op; the checkpoint format is the same.
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
      "zero_optimization": {"stage": stage},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
eng = engine.initialize(model, model.parameters(), ds)
for step in (1, 2):
    x = torch.randint(0, 257, (2, 33))
    eng.backward(eng(x[:, :-1]).float().logsumexp(-1).mean())
    eng.step()
    checkpoint.save(eng, out, step, {"step": step, "model_config": dataclasses.asdict(cfg), "tokenizer": "bytes"})
    models.save(eng.module, f"{out}/reference_{step}")
"""


def make_run(run_dir: Path, stage: int) -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, str(run_dir), str(stage)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ds") / "run", stage=2)


def same_weights(a: models.GPT, b: models.GPT) -> bool:
    return equal_state(a.state_dict(), b.state_dict())


def test_run_dir_checkpoint_and_tag_resolve_to_the_right_weights(run_dir):
    latest = models.load(run_dir / "reference_2")
    first = models.load(run_dir / "reference_1")
    model, spec, info = load_model(run_dir)
    assert spec == "bytes" and info["step"] == 2 and info["kind"] == "run-checkpoint"
    assert same_weights(model, latest)
    assert model.lm_head.weight is model.wte.weight  # tied head restored
    for path in (run_dir / "checkpoints" / "step_0000001", run_dir / "step_0000001", run_dir / "1"):
        model, _, info = load_model(path)
        assert info["step"] == 1 and same_weights(model, first)


def test_eval_ppl_on_a_run_dir_matches_the_model(run_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(pydoc_text(3000))
    result = run_ppl(PplConfig(model_path=str(run_dir), text_file=str(text), context=64, stride=32, progress=False))
    direct = perplexity(models.load(run_dir / "reference_2"), list(text.read_bytes()), 64, 32, prefix=256)
    assert result["nll"] == pytest.approx(direct["nll"], rel=1e-9) and result["tokens"] == direct["tokens"]


def test_eval_ppl_on_a_run_dir_defaults_to_its_training_data(run_dir, files, tmp_path):
    """`eval-ppl --model-path RUN` (what pretrain's summary suggests) scores the run's own val shards."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    tokens, _ = byte_dataset(tmp_path / "data", files["text"].read_text())
    (run / "config.yaml").write_text(f"model: tiny\ndata: {tmp_path / 'data'}\nout: {run}\n")
    result = run_ppl(PplConfig(model_path=str(run), context=64, stride=64, progress=False))
    direct = perplexity(models.load(run / "reference_2"), tokens, 64, 64, prefix=256)
    assert result["tokens"] == direct["tokens"] and result["nll"] == pytest.approx(direct["nll"], rel=1e-9)
    (run / "config.yaml").write_text("model: tiny\ndata: data/elsewhere\n")
    with pytest.raises(UserError, match="trained on data/elsewhere, which is not a directory from here"):
        run_ppl(PplConfig(model_path=str(run), progress=False))
    with pytest.raises(UserError, match="give one of --data DIR, --text-file FILE, --hf-dataset NAME"):
        run_ppl(PplConfig(model_path=str(files["consolidated"]), progress=False))


def test_incomplete_checkpoint_is_refused(run_dir, tmp_path):

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "step_0000002" / "COMPLETE").unlink()
    model, _, info = load_model(copy)  # a run dir falls back to the newest complete checkpoint
    assert info["step"] == 1
    with pytest.raises(UserError, match="incomplete"):
        load_model(copy / "checkpoints" / "step_0000002")
    for ckpt in (copy / "checkpoints").glob("step_*"):
        (ckpt / "COMPLETE").unlink(missing_ok=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_model(copy)


def test_zero0_checkpoint_without_optimizer_shards(tmp_path):
    run = make_run(tmp_path / "run0", stage=0)
    model, spec, info = load_model(run)
    assert info["step"] == 2 and same_weights(model, models.load(run / "reference_2"))


@pytest.mark.slow
def test_data_parallel_eval_equals_one_rank(files, tmp_path):
    args = ["eval-ppl", "--model-path", str(files["consolidated"]), "--text-file", str(files["text"]),
            "--context", "64", "--stride", "24", "--batch-size", "3", "--no-progress", "--json"]
    one, two = run_cli(args), run_cli(args, ranks=2)
    r1 = json.loads(one.stdout.strip().splitlines()[-1])
    r2 = json.loads([line for line in two.stdout.splitlines() if line.startswith("{")][-1])
    assert r2["world_size"] == 2 and r1["tokens"] == r2["tokens"]
    assert r2["nll"] == pytest.approx(r1["nll"], rel=1e-9)


def test_init_from_copies_weights_across_vocab_padding(files):
    from trainer.eval.modelio import load_weights_into

    target = models.GPT(models.get_config("tiny", vocab_size=257, padded_vocab_size=320))
    load_weights_into(target, files["hf"])  # the HF export has 257 rows, this model 320
    tokens = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        assert torch.allclose(target.eval()(tokens), files["model"](tokens), atol=1e-5)
    assert target.wte.weight[257:].abs().sum() == 0
    with pytest.raises(UserError, match="n_layer 2 vs 3"):
        load_weights_into(models.GPT(models.get_config("tiny", vocab_size=257, n_layer=3)), files["hf"])
