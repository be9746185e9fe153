"""--doc-masking: in packed windows a token attends only within its own document, and positions restart at
each document, so a document's outputs do not depend on the documents before it; a window without a
boundary is computed exactly as without the option."""
import pytest
import torch
import yaml
from helpers import TINY_ARGS, curve, run_cli

import models
from models.layers import positions_in_documents
from trainer.data.prefetch import document_segments

EOT = 256


def model(preset: str) -> models.GPT:
    torch.manual_seed(0)
    overrides = models.config.GPT25 if preset == "gpt25" else {}
    return models.GPT(models.get_config("tiny", vocab_size=257, **overrides)).eval()


def segments(x: torch.Tensor) -> torch.Tensor:
    return (x == EOT).cumsum(dim=-1)


def window(*docs) -> torch.Tensor:
    """One packed window: each document starts with end-of-text, as in the shards."""
    return torch.cat([torch.cat([torch.tensor([EOT]), d]) for d in docs])[None]


@pytest.mark.parametrize("preset", ["gpt2", "gpt25"])  # learned positions / RoPE
def test_a_documents_logits_do_not_depend_on_the_document_before_it(preset):
    m, g = model(preset), torch.Generator().manual_seed(1)
    first, other, doc = (torch.randint(0, EOT, (n,), generator=g) for n in (20, 20, 30))
    with torch.no_grad():
        after_first = m(window(first, doc), segments=segments(window(first, doc)))[0, -31:]
        after_other = m(window(other, doc), segments=segments(window(other, doc)))[0, -31:]
        alone = m(window(doc))[0]
        unmasked = m(window(first, doc))[0, -31:]
    assert torch.equal(after_first, after_other)  # bitwise: the other document's tokens are never read
    assert torch.allclose(after_first, alone, atol=1e-5)  # as if it were alone in its window (positions from 0)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # without the option the first document leaks in


@pytest.mark.parametrize("preset", ["gpt2", "gpt25"])
def test_a_window_without_a_boundary_equals_no_masking_bitwise(preset):
    m, g = model(preset), torch.Generator().manual_seed(2)
    x = window(torch.randint(0, EOT, (40,), generator=g)).repeat(3, 1)
    targets = torch.randint(0, EOT, x.shape, generator=g)
    with torch.no_grad():
        assert torch.equal(m(x, segments=segments(x)), m(x))
        assert torch.equal(m(x, targets, segments=segments(x)), m(x, targets))
    assert document_segments(segments(x), slice(None), "cpu") is None  # the trainer then passes segments=None


def test_positions_restart_at_every_document():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3, 3]])
    expected = [[0, 1, 0, 1, 2, 0, 1], list(range(7))]
    assert positions_in_documents(seg).tolist() == expected


def test_masked_training_step_has_gradients_with_activation_checkpointing():
    m, g = model("gpt25"), torch.Generator().manual_seed(3)
    m.train().set_activation_checkpointing(True)
    x = window(*(torch.randint(0, EOT, (n,), generator=g) for n in (10, 20, 15)))
    loss = m(x, torch.roll(x, -1, 1), segments=segments(x))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())


def test_a_run_on_one_long_document_is_the_same_with_and_without_the_option(tmp_path):
    """Every window of a one-document corpus lies inside the document: --doc-masking changes nothing, bitwise."""
    from trainer.data.convert import convert
    from trainer.data.sources import iter_documents

    (tmp_path / "book.txt").write_text("\n\n".join(iter_documents("pydoc")))
    convert(str(tmp_path / "book.txt"), "bytes", tmp_path / "data", progress=False)
    runs = {}
    for flag in ("--doc-masking", "--no-doc-masking"):
        runs[flag] = tmp_path / flag.strip("-")
        run_cli(["pretrain", *TINY_ARGS, "--data", str(tmp_path / "data"), "--out", str(runs[flag]), "--max-steps",
                 "3", "--save-every", "0", "--no-tracking", flag])
    assert curve(runs["--doc-masking"], "loss") == curve(runs["--no-doc-masking"], "loss")
    assert yaml.safe_load((runs["--doc-masking"] / "config.yaml").read_text())["doc_masking"] is True
