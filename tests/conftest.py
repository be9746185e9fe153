"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The pydoc corpus as byte-level shards (one per test module: some tests damage copies of it)."""
    from trainer.convert import convert

    out = tmp_path_factory.mktemp("data") / "pydoc-bytes"
    convert("pydoc", "bytes", out, shard_tokens=200_000, val_tokens=20_000, workers=1, progress=False)
    return out


@pytest.fixture(autouse=True, scope="session")
def _remove_shm_buffers():
    """deepspeed_allreduce_buffer_* files (~69 MB per rank) outlive even clean exits; a killed run's certainly do."""
    yield
    from helpers import remove_shm_buffers

    remove_shm_buffers()
