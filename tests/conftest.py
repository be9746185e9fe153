"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The pydoc corpus as byte-level shards (one per test module: some tests damage copies of it)."""
    from trainer.data.convert import convert

    out = tmp_path_factory.mktemp("data") / "pydoc-bytes"
    convert("pydoc", "bytes", out, shard_tokens=200_000, val_tokens=20_000, workers=1, progress=False)
    return out


@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    """An in-process pretrain / finetune that must fail before training: no process group, reaching the
    DeepSpeed engine fails the test; the working directory is a fresh scratch dir (returned)."""
    from trainer.engine import build as engine

    def trap(*args, **kwargs):
        raise AssertionError("bad input reached deepspeed.initialize")

    monkeypatch.setattr(engine, "init_distributed", lambda: None)
    monkeypatch.setattr(engine, "initialize", trap)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd
