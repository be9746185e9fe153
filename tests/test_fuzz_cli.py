"""Hypothesis fuzzing of the `pretrain` option parser and of the shard reader.

Properties: any option list either gets as far as the DeepSpeed engine (a trap here: valid input) or
exits with exactly one `Error` line and no traceback, writing nothing; any shard header / length /
meta.json either reads back consistently or is refused with a UserError naming the file.
"""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.cli import cli
from trainer.data.shards import HEADER_BYTES, MAGIC, Dataset, read_shard
from trainer.errors import UserError

_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=12)
_number = st.one_of(st.integers(-3, 300).map(str), st.floats(-10, 10).map(str),
                    st.sampled_from(["nan", "inf", "-inf", "1e309"]), _text)
# Values are kept small where a valid one would build something big (presets, widths, lengths).
OPTIONS = {
    "--model": st.sampled_from(["tiny", "gpt3", "", "TINY", "tiny "]),
    "--set": st.one_of(st.sampled_from(["n_layer=1", "n_head=3", "dropout=2", "norm=batchnorm", "bias=maybe",
                                        "n_layers=2", "=1", "n_layer", "mlp=swiglu", "block_size=32"]), _text),
    "--seq-len": _number, "--micro-batch": _number, "--grad-accum": _number, "--global-batch": _number,
    "--global-batch-tokens": _number, "--max-steps": _number, "--max-tokens": _number, "--epochs": _number,
    "--max-time": st.one_of(st.sampled_from(["1h", "90m", "1h30m", "soon", "-5s", "0"]), _text),
    "--lr": _number, "--min-lr": _number, "--warmup-steps": _number, "--weight-decay": _number,
    "--schedule": st.sampled_from(["cosine", "linear", "constant", "wsd", "step", ""]),
    "--grad-clip": _number, "--seed": _number, "--max-skips": _number, "--max-rollbacks": _number,
    "--eval-every": _number, "--eval-batches": _number, "--save-every": _number, "--keep-last": _number,
    "--log-every": _number, "--resume": st.sampled_from(["auto", "never", "/no/such/ckpt", "", "AUTO"]),
    "--ds-config": st.sampled_from(["zero2_fp32", "zero1_bf16", "zero9", "", "auto", "/etc/hostname"]),
    "--stop-after-steps": _number, "--hellaswag-every": _number,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from trainer.data.convert import convert

    out = tmp_path_factory.mktemp("data") / "pydoc-bytes"
    convert("pydoc", "bytes", out, shard_tokens=200_000, val_tokens=20_000, workers=1, progress=False)
    return out


class _ReachedEngine(Exception):
    pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(OPTIONS)).flatmap(lambda o: st.tuples(st.just(o), OPTIONS[o])), max_size=6))
def test_pretrain_option_parser_never_crashes(dataset, tmp_path, monkeypatch, pairs):
    from trainer.engine import build as engine

    def trap(*args, **kwargs):
        raise _ReachedEngine

    monkeypatch.setattr(engine, "init_distributed", lambda: None)
    monkeypatch.setattr(engine, "initialize", trap)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fuzz-run"
    shutil.rmtree(out, ignore_errors=True)
    args = ["pretrain", "--data", str(dataset), "--out", str(out), "--model", "tiny", "--max-steps", "2",
            "--ds-config", "zero2_fp32", "--no-tracking"]
    for option, value in pairs:
        args += [option, value]
    result = CliRunner().invoke(cli, args)
    if isinstance(result.exception, _ReachedEngine):
        return  # valid input: the run would start
    assert isinstance(result.exception, SystemExit) and result.exit_code != 0, \
        f"{args} -> {result.exception!r}\n{result.output}"
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not out.exists()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=st.sampled_from([MAGIC, MAGIC + 1, 0, -1]), version=st.integers(-1, 4),
       count=st.integers(-2, 70), body=st.integers(0, 300), vocab=st.sampled_from([None, 50, 257, 70_000]),
       fill=st.integers(0, 2**32 - 1))
def test_shard_reader_reads_consistently_or_names_the_file(tmp_path, magic, version, count, body, vocab, fill):
    path = tmp_path / "train_000000.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, count]
    rng = np.random.default_rng(fill)
    path.write_bytes(header.tobytes() + rng.integers(0, 256, body, dtype=np.uint8).tobytes())
    try:
        tokens = read_shard(path, vocab_size=vocab)
    except UserError as e:
        assert str(path) in str(e)
        return
    width = {1: 2, 2: 4}[version]
    assert magic == MAGIC and len(tokens) == count and HEADER_BYTES + count * width == HEADER_BYTES + body
    assert vocab is None or count == 0 or int(tokens.max()) < vocab


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["tokenizer", "vocab_size", "eot_id", "shards", "train_tokens"]),
       value=st.one_of(st.none(), st.integers(-5, 100_000), st.text(max_size=8), st.just([]),
                       st.just([{"name": "train_000000.bin", "tokens": 3}])),
       drop=st.booleans())
def test_dataset_open_with_a_mangled_meta_json(dataset, tmp_path_factory, key, value, drop):
    copy = tmp_path_factory.mktemp("meta") / "d"
    shutil.copytree(dataset, copy)
    meta = json.loads((copy / "meta.json").read_text())
    if drop:
        meta.pop(key, None)
    else:
        meta[key] = value
    (copy / "meta.json").write_text(json.dumps(meta))
    try:
        opened = Dataset.open(copy)
    except UserError as e:
        assert str(copy) in str(e)
        return
    assert opened.train_tokens > 0
