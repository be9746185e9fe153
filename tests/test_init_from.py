"""`pretrain --init-from`: start from a consolidated model or an HF GPT-2 / Llama-shaped checkpoint.

The run builds its model from the preset, `--set` overrides and the dataset's vocabulary (padded
to a multiple of 64), then copies the weights in (trainer.eval.modelio.load_weights_into). Checked: the
copied model reproduces the source's logits at step 0, in process for every source kind and end
to end through the CLI (first logged loss = the source's loss on the first batch; a run whose only
update is negligible saves a checkpoint with exactly the source's logits); a different
architecture is refused with the differing field named.
"""

import pytest
import torch
from helpers import drive, metrics

import models
from models.loss import cross_entropy as lm_loss
from trainer.config import TrainConfig
from trainer.data.shards import Dataset, TrainStream
from trainer.errors import UserError
from trainer.eval.modelio import load_model, load_weights_into
from trainer.train.pretrain import build_model_config

SMALL = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "4", "--global-batch", "8", "--ds-config",
         "zero2_fp32", "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--seed", "3"]


def run_model(data, model="tiny", **overrides):
    """The model `pretrain --model X --set ...` builds on this dataset (vocab 257, padded to 320), before init."""
    cfg = TrainConfig(model=model, data=str(data), model_overrides=overrides)
    torch.manual_seed(0)
    return models.GPT(build_model_config(cfg, Dataset.open(data)))


def source_model(seed=1, model="tiny", **overrides):
    """A trained-looking source: random weights, norms and biases perturbed so nothing is at its init value."""
    torch.manual_seed(seed)
    src = models.GPT(models.get_config(model, vocab_size=257, padded_vocab_size=257, **overrides))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return src.eval()


def max_logit_diff(a, b, vocab=257) -> float:
    tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (a.eval()(tokens) - b.eval()(tokens)).abs().max().item()


@pytest.mark.parametrize("kind", ["consolidated", "hf-gpt2", "hf-llama"])
def test_init_from_reproduces_the_source_logits(data, tmp_path, kind):
    preset = "gpt25" if kind == "hf-llama" else "tiny"
    shape = dict(n_layer=2, n_head=4, n_embd=64, block_size=64) if preset == "gpt25" else {}
    src = source_model(model=preset, **shape)
    if kind == "consolidated":
        models.save(src, tmp_path / "model")
    else:
        models.hf.to_hf(src).save_pretrained(tmp_path / "model")
    target = run_model(data, preset, **shape)
    assert target.config.padded_vocab_size == 320 and src.config.padded_vocab_size == 257
    load_weights_into(target, tmp_path / "model")
    assert max_logit_diff(target, src) < 1e-5
    assert target.wte.weight.shape[0] == 320  # pad rows stay; their logits are never returned


@pytest.mark.parametrize("overrides, named", [
    (dict(vocab_size=512, padded_vocab_size=512), "vocab_size 512 vs 257"),  # another tokenizer
    (dict(n_layer=3), "n_layer 3 vs 2"),
    (dict(rotary_dim=8), "rotary_dim 8 vs 0"),
])
def test_init_from_another_architecture_names_the_field(data, tmp_path, overrides, named):
    torch.manual_seed(0)
    src = models.GPT(models.get_config("tiny", **{"vocab_size": 257, **overrides}))
    models.save(src, tmp_path / "model")
    with pytest.raises(UserError, match=named):
        load_weights_into(run_model(data), tmp_path / "model")


def test_init_from_end_to_end(data, tmp_path):
    src = source_model()
    models.save(src, tmp_path / "source")
    models.save(source_model(n_layer=3), tmp_path / "deeper")
    jobs = [
        {"name": "step0", "pretrain": [*SMALL, "--data", str(data), "--out", str(tmp_path / "step0"),
                                       "--init-from", str(tmp_path / "source"), "--max-steps", "1"]},
        # lr 1e-30: the one update is far below fp32 resolution, so the checkpoint holds the step-0 weights
        {"name": "frozen", "pretrain": [*SMALL, "--data", str(data), "--out", str(tmp_path / "frozen"),
                                        "--init-from", str(tmp_path / "source"), "--max-steps", "1",
                                        "--lr", "1e-30", "--min-lr", "0"]},
        {"name": "mismatch", "pretrain": [*SMALL, "--data", str(data), "--out", str(tmp_path / "mismatch"),
                                          "--init-from", str(tmp_path / "deeper"), "--max-steps", "1"]},
    ]
    results = drive(jobs, tmp_path)
    for name in ("step0", "frozen"):
        assert "error" not in results[name], results[name]["error"]

    # The first logged loss is computed with the step-0 weights on the first global batch.
    x, y = TrainStream(Dataset.open(data), 64, 8, seed=3).local_batch(0, 0, 1)
    with torch.no_grad():
        expected = lm_loss(src(x), y).item()
    first = metrics(tmp_path / "step0")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, abs=1e-5)

    saved, _, info = load_model(tmp_path / "frozen")
    assert info["step"] == 1
    assert max_logit_diff(saved, src) == 0.0

    assert results["mismatch"]["error"].startswith("UserError: --init-from")
    assert "n_layer 3 vs 2" in results["mismatch"]["error"]
    assert not (tmp_path / "mismatch" / "checkpoints").exists()
