"""Shards and streams: what goes in comes out, corrupt files are refused by name, order is resumable."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data.convert import convert
from trainer.data.shards import HEADER_BYTES, MAGIC, Dataset, TrainStream, ValStream, read_shard, write_shard
from trainer.data.sources import iter_documents
from trainer.data.tokenizer import get_tokenizer
from trainer.dist import rank_share
from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pydoc_bytes(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "pydoc-bytes"
    convert("pydoc", "bytes", out, shard_tokens=100_000, val_tokens=20_000, progress=False)
    return out


def decode_documents(dataset: Dataset, tokenizer) -> list[str]:
    tokens = np.concatenate([dataset.val_tokens_array(), dataset.train_tokens_array()]).astype(np.int64)
    starts = np.flatnonzero(tokens == dataset.eot_id)
    assert starts[0] == 0  # every document starts with end-of-text
    return [tokenizer.decode(tokens[a + 1:b]) for a, b in zip(starts, [*starts[1:], len(tokens)])]


@pytest.mark.parametrize("spec", ["gpt2", "bytes"])
def test_text_round_trips_through_shards(spec, tmp_path):
    docs = list(iter_documents("pydoc"))[:60]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    convert(str(src), spec, tmp_path / "out", shard_tokens=20_000, val_tokens=3_000, progress=False)
    dataset = Dataset.open(tmp_path / "out")
    assert len(dataset.train_shards) > 1 and dataset.val_tokens >= 3_000
    assert decode_documents(dataset, get_tokenizer(spec)) == docs


def test_sources_jsonl_gz_parquet_and_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "one"}) + "\n" + json.dumps({"content": "two"}) + "\n")
    pq.write_table(pa.table({"content": ["three", "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("five")
    assert list(iter_documents(str(tmp_path / "a.jsonl.gz"), "content")) == ["one", "two"]
    assert list(iter_documents(str(tmp_path / "b.parquet"), "content")) == ["three", "four"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["five"]
    with pytest.raises(UserError, match="no field 'text'.*--text-field"):
        list(iter_documents(str(tmp_path / "a.jsonl.gz")))


def test_worker_count_does_not_change_a_byte(tmp_path):
    for workers in (1, 2):
        convert("pydoc", "gpt2", tmp_path / f"w{workers}", shard_tokens=30_000, val_tokens=5_000, workers=workers,
                progress=False)
    for shard in sorted((tmp_path / "w1").glob("*.bin")):
        assert shard.read_bytes() == (tmp_path / "w2" / shard.name).read_bytes()


def interrupt_on_write(monkeypatch, n: int) -> None:
    """Ctrl-C as the conversion writes its n-th shard (the earlier ones are written for real)."""
    import trainer.data.convert as conv

    real, calls = conv.write_shard, {"n": 0}

    def write_shard(path, tokens, vocab_size=None):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(path, tokens, vocab_size=vocab_size)

    monkeypatch.setattr(conv, "write_shard", write_shard)


def test_interrupted_conversion_resumes_without_redoing_shards(tmp_path, monkeypatch):
    out = tmp_path / "out"
    reference = tmp_path / "ref"
    convert("pydoc", "bytes", reference, shard_tokens=50_000, val_tokens=10_000, progress=False)
    interrupt_on_write(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        convert("pydoc", "bytes", out, shard_tokens=50_000, val_tokens=10_000, progress=False)
    assert not (out / "meta.json").exists()
    first_two = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert len(first_two) == 2
    monkeypatch.undo()  # the real write_shard again
    convert("pydoc", "bytes", out, shard_tokens=50_000, val_tokens=10_000, progress=False)
    assert all((out / name).stat().st_mtime_ns == t for name, t in first_two.items())  # not rewritten
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(p.name for p in reference.glob("*.bin"))
    for shard in reference.glob("*.bin"):
        assert shard.read_bytes() == (out / shard.name).read_bytes()


def test_default_validation_split_fits_a_small_corpus(tmp_path, monkeypatch):
    """`convert_shards.py --source pydoc --tokenizer bytes --out DIR` with no --val-tokens: about 5% of the
    tokens held out as whole documents, every document in exactly one split; capped on a large corpus."""
    import trainer.data.convert as conv

    proc = subprocess.run([sys.executable, "tools/convert_shards.py", "--source", "pydoc", "--tokenizer", "bytes",
                           "--out", str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dataset, tok = Dataset.open(tmp_path / "d"), get_tokenizer("bytes")
    val, train = dataset.val_tokens_array(), dataset.train_tokens_array()
    assert 0.04 <= len(val) / (len(val) + len(train)) <= 0.06
    docs = lambda t: [tok.decode(d[1:]) for d in np.split(t, np.flatnonzero(t == tok.eot_id))[1:]]  # noqa: E731
    assert val[0] == train[0] == tok.eot_id
    assert sorted(docs(val) + docs(train)) == sorted(d for d in iter_documents("pydoc"))
    monkeypatch.setattr(conv, "VAL_CAP", 5_000)
    meta = convert("pydoc", "bytes", tmp_path / "capped", progress=False)
    assert 0 < meta["val_tokens_written"] <= 5_000


def _one_book(path: Path) -> np.ndarray:
    """A corpus of one document (the pydoc topics joined into one .txt file); returns its token stream."""
    path.write_text("\n\n".join(iter_documents("pydoc")))
    tok = get_tokenizer("bytes")
    return np.asarray([tok.eot_id, *tok.encode(path.read_text())])


def _splits(out: Path) -> tuple[np.ndarray, np.ndarray]:
    dataset = Dataset.open(out)
    return dataset.train_tokens_array(), dataset.val_tokens_array()


def test_a_single_text_file_gets_the_tail_of_its_token_stream_for_validation(tmp_path):
    """One .txt file is one document: no document-level split exists, so validation is the stream's last 5%
    by default, or the last N tokens with --val-tokens N; the summary line says so; pretrain trains on it."""
    stream = _one_book(tmp_path / "book.txt")
    proc = subprocess.run([sys.executable, "tools/convert_shards.py", "--source", str(tmp_path / "book.txt"),
                           "--tokenizer", "bytes", "--out", str(tmp_path / "d")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    train, val = _splits(tmp_path / "d")
    assert len(val) == int(0.05 * len(stream)) and np.array_equal(np.concatenate([train, val]), stream)
    assert f"{len(val):,} val tokens" in proc.stdout and "last" in proc.stdout and "too few documents" in proc.stdout
    convert(str(tmp_path / "book.txt"), "bytes", tmp_path / "n", val_tokens=100_000, progress=False)
    train, val = _splits(tmp_path / "n")
    assert len(val) == 100_000 and np.array_equal(np.concatenate([train, val]), stream)
    with pytest.raises(UserError, match="would hold all of them out"):
        convert(str(tmp_path / "book.txt"), "bytes", tmp_path / "all", val_tokens=len(stream), progress=False)
    run = subprocess.run([sys.executable, "-m", "trainer.cli", "pretrain", "--model", "tiny", "--data",
                          str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--seq-len", "64", "--micro-batch",
                          "4", "--max-steps", "2", "--eval-every", "2", "--eval-batches", "2", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["val_loss"] is not None


def test_a_tail_that_reaches_into_written_train_shards_rewrites_them(tmp_path):
    """Three files, each larger than a train shard and none small enough for validation: the tail comes out
    of the last train shard already written; nothing is lost or duplicated, no stale shard is left."""
    stream = _one_book(tmp_path / "book.txt")
    text = (tmp_path / "book.txt").read_text()
    (tmp_path / "three").mkdir()
    third = len(text) // 3
    parts = [text[:third], text[third:2 * third], text[2 * third:]]
    for i, part in enumerate(parts):
        (tmp_path / "three" / f"part{i}.txt").write_text(part)
    tok = get_tokenizer("bytes")
    stream = np.concatenate([[tok.eot_id, *tok.encode(part)] for part in parts])
    meta = convert(str(tmp_path / "three" / "*.txt"), "bytes", tmp_path / "d", shard_tokens=100_000, progress=False)
    train, val = _splits(tmp_path / "d")
    assert len(val) == int(0.05 * len(stream)) and np.array_equal(np.concatenate([train, val]), stream)
    assert sorted(p.name for p in (tmp_path / "d").glob("*.bin")) == sorted(s["name"] for s in meta["shards"])
    assert "last" in meta["val_rule"]


def test_a_conversion_interrupted_while_the_tail_is_cut_out_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    """The tail comes out of a shard already written: the state goes back before that shard first, so a Ctrl-C
    after the shards are rewritten but before the state records them loses nothing; the resumed conversion
    gives the same bytes."""
    text = "\n\n".join(iter_documents("pydoc"))
    (tmp_path / "three").mkdir()
    third = len(text) // 3
    for i, part in enumerate((text[:third], text[third:2 * third], text[2 * third:])):
        (tmp_path / "three" / f"part{i}.txt").write_text(part)
    source = str(tmp_path / "three" / "*.txt")
    convert(source, "bytes", tmp_path / "ref", shard_tokens=100_000, progress=False)
    import trainer.data.convert as conv

    real = conv._write_json

    def write_json(path, data):  # Ctrl-C right after the last shards are written, before the state says so
        if path.name == conv.STATE and any(shard["split"] == "val" for shard in data["shards"]):
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(conv, "_write_json", write_json)
    with pytest.raises(KeyboardInterrupt):
        convert(source, "bytes", tmp_path / "out", shard_tokens=100_000, progress=False)
    monkeypatch.undo()
    convert(source, "bytes", tmp_path / "out", shard_tokens=100_000, progress=False)
    names = sorted(p.name for p in (tmp_path / "ref").glob("*.bin"))
    assert names == sorted(p.name for p in (tmp_path / "out").glob("*.bin"))
    assert all((tmp_path / "ref" / n).read_bytes() == (tmp_path / "out" / n).read_bytes() for n in names)


def test_one_jsonl_record_is_split_the_same_way(tmp_path):
    stream = _one_book(tmp_path / "book.txt")
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": (tmp_path / "book.txt").read_text()}) + "\n")
    convert(str(tmp_path / "one.jsonl"), "bytes", tmp_path / "d", progress=False)
    train, val = _splits(tmp_path / "d")
    assert len(val) == int(0.05 * len(stream)) and np.array_equal(np.concatenate([train, val]), stream)


def test_default_split_resumes_byte_identical(tmp_path, monkeypatch):
    convert("pydoc", "bytes", tmp_path / "ref", shard_tokens=40_000, progress=False)
    interrupt_on_write(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        convert("pydoc", "bytes", tmp_path / "out", shard_tokens=40_000, progress=False)
    monkeypatch.undo()  # the real write_shard again
    convert("pydoc", "bytes", tmp_path / "out", shard_tokens=40_000, progress=False)
    names = sorted(p.name for p in (tmp_path / "ref").glob("*.bin"))
    assert names == sorted(p.name for p in (tmp_path / "out").glob("*.bin")) and len(names) > 4
    assert all((tmp_path / "ref" / n).read_bytes() == (tmp_path / "out" / n).read_bytes() for n in names)


def test_a_changed_setting_is_named_with_the_way_forward(tmp_path, monkeypatch):
    import trainer.data.convert as conv

    out = tmp_path / "d"
    with pytest.raises(UserError, match=r"holds only 466,\d+ tokens, and --val-tokens 10000000 would hold all of "
                                        r"them out.*pass a smaller --val-tokens"):
        convert("pydoc", "bytes", out, val_tokens=10_000_000, progress=False)
    assert not out.exists()  # nothing written, so a rerun with other settings just works

    real, calls = conv.write_shard, {"n": 0}

    def crash_on_third(path, tokens, vocab_size=None):  # after the first val + train shards are recorded
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, tokens, vocab_size=vocab_size)

    monkeypatch.setattr(conv, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert("pydoc", "bytes", out, shard_tokens=50_000, progress=False)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"interrupted conversion made with --val-tokens default \(now 20000\); "
                                        r"rerun with its settings to finish it, or delete"):
        convert("pydoc", "bytes", out, shard_tokens=50_000, val_tokens=20_000, progress=False)
    convert("pydoc", "bytes", out, shard_tokens=50_000, progress=False)  # its settings: finishes
    with pytest.raises(UserError, match=r"different dataset, made with --shard-tokens 50000 \(now 100000000\)"):
        convert("pydoc", "bytes", out, progress=False)


def test_existing_token_files_are_resharded(tmp_path, pydoc_bytes):
    tokens = Dataset.open(pydoc_bytes).train_tokens_array()
    np.asarray(tokens, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.save(tmp_path / "shard.npy", np.asarray(tokens, dtype=np.uint16))
    for spec in (f"nanogpt:{tmp_path / 'train.bin'}", f"npy:{tmp_path / '*.npy'}",
                 f"llmc:{pydoc_bytes / 'train_*.bin'}"):
        out = tmp_path / spec.split(":")[0]
        meta = convert(spec, "bytes", out, shard_tokens=100_000, val_tokens=10_000, progress=False)
        assert meta["train_tokens"] + meta["val_tokens_written"] == len(tokens)
        again = Dataset.open(out)
        assert np.array_equal(np.concatenate([again.val_tokens_array(), again.train_tokens_array()]), tokens)


def test_uint32_shards_for_large_vocabularies(tmp_path):
    write_shard(tmp_path / "big.bin", [0, 70_000, 5], vocab_size=100_000)
    assert np.frombuffer((tmp_path / "big.bin").read_bytes()[:12], "<i4").tolist() == [MAGIC, 2, 3]
    assert read_shard(tmp_path / "big.bin").tolist() == [0, 70_000, 5]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-2], "truncated"),
    (lambda b: b[:100], "shorter than the 1024-byte header"),
    (lambda b: np.int32(7).tobytes() + b[4:], "magic 7"),
    (lambda b: b[:4] + np.int32(9).tobytes() + b[8:], "version 9"),
])
def test_damaged_shards_are_refused_by_name(tmp_path, damage, message):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), vocab_size=257)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)


def test_out_of_range_ids_and_meta_mismatch(tmp_path, pydoc_bytes):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(pydoc_bytes, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["vocab_size"] = 100
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"token id \d+ >= vocab size 100"):
        Dataset.open(copy)
    meta["vocab_size"] = 257
    meta["shards"][0]["tokens"] += 1
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json records"):
        Dataset.open(copy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000))
def test_reader_never_crashes_on_arbitrary_bytes(tmp_path, blob):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(blob)
    try:
        tokens = read_shard(path, vocab_size=300)
        assert len(tokens) == (len(blob) - HEADER_BYTES) // 2 or len(tokens) == (len(blob) - HEADER_BYTES) // 4
    except UserError:
        pass


def test_cursor_resume_and_rank_slices_see_the_same_global_batches(pydoc_bytes):
    dataset = Dataset.open(pydoc_bytes)
    stream = TrainStream(dataset, seq_len=32, global_batch=8, seed=3)
    for cursor in (0, 8, 800, stream.samples_per_epoch - 4):  # includes an epoch rollover inside a batch
        x1, y1 = stream.local_batch(cursor, 0, 1)
        parts = [stream.local_batch(cursor, r, 2) for r in range(2)]
        assert np.array_equal(x1.numpy(), np.concatenate([p[0].numpy() for p in parts]))
        assert np.array_equal(y1[:, :-1].numpy(), x1[:, 1:].numpy())  # targets are inputs shifted by one
        fresh = TrainStream(dataset, seq_len=32, global_batch=8, seed=3)  # a resumed run: O(1), no replay
        assert np.array_equal(fresh.local_batch(cursor, 0, 1)[0].numpy(), x1.numpy())


def test_an_epoch_covers_every_window_once_and_epochs_differ(pydoc_bytes):
    stream = TrainStream(Dataset.open(pydoc_bytes), seq_len=64, global_batch=4, seed=0)
    n = stream.samples_per_epoch
    first = [tuple(stream.sample(i)[:8]) for i in range(n)]
    windows = [tuple(stream.windows.get(i)[:8]) for i in range(n)]
    assert sorted(first) == sorted(windows)
    assert [tuple(stream.sample(n + i)[:8]) for i in range(20)] != first[:20]
    assert TrainStream(Dataset.open(pydoc_bytes), 64, 4, seed=1).sample(0).tolist() != stream.sample(0).tolist()


def test_validation_batches_are_fixed_and_split_across_ranks(pydoc_bytes):
    val = ValStream(Dataset.open(pydoc_bytes), seq_len=32, batch_size=4)
    once = [val.batch(b)[0].numpy() for b in range(val.count(6))]
    assert all(np.array_equal(a, b) for a, b in zip(once, [val.batch(b)[0].numpy() for b in range(val.count(6))]))
    split = [val.batch(b)[0].numpy() for r in range(2) for b in rank_share(val.count(6), r, 2) if b is not None]
    assert sorted(map(bytes, once)) == sorted(map(bytes, split))


@given(n=st.integers(0, 50), world=st.integers(1, 8))
def test_every_rank_gets_the_same_number_of_forwards_and_each_item_once(n, world):
    shares = [rank_share(n, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-n // world)
    real = sorted(i for s in shares for i in s if i is not None)
    assert real == list(range(n))


@pytest.mark.parametrize("args, message", [
    (["--source", "/no/such/*.txt", "--tokenizer", "gpt2"], "no such file"),
    (["--source", "pydoc", "--tokenizer", "gpt5"], "unknown tokenizer spec"),
    (["--source", "EMPTY", "--tokenizer", "bytes"], "no documents"),
])
def test_convert_cli_errors_are_one_line(tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    proc = subprocess.run([sys.executable, "tools/convert_shards.py", *args, "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_output_dir_with_another_dataset_is_refused(tmp_path, pydoc_bytes):
    with pytest.raises(UserError, match="different dataset"):
        convert("pydoc", "gpt2", pydoc_bytes, progress=False)
