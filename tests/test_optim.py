"""LR schedule endpoints and weight-decay groups: the numbers a user's run depends on."""
import math

import pytest
import torch

from trainer.train.optim import lr_at, param_groups

KW = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, total_steps=110)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_warmup_then_decay_to_min(schedule):
    assert lr_at(0, schedule=schedule, **KW) == pytest.approx(6e-5)       # 1/10 of peak on the first step
    assert lr_at(9, schedule=schedule, **KW) == pytest.approx(6e-4)       # peak at the end of warmup
    assert lr_at(110, schedule=schedule, **KW) == pytest.approx(6e-5)     # min at the end
    assert lr_at(10_000, schedule=schedule, **KW) == pytest.approx(6e-5)  # and stays there
    values = [lr_at(s, schedule=schedule, **KW) for s in range(10, 111)]
    assert all(a >= b - 1e-15 for a, b in zip(values, values[1:]))        # never increases after warmup


def test_cosine_midpoint_is_halfway():
    assert lr_at(60, schedule="cosine", **KW) == pytest.approx((6e-4 + 6e-5) / 2)


def test_wsd_holds_peak_until_the_decay_window():
    # 20% of 110 steps = 22 decay steps starting at step 88
    assert lr_at(87, schedule="wsd", **KW) == pytest.approx(6e-4)
    assert lr_at(99, schedule="wsd", **KW) < 6e-4


def test_constant_after_warmup():
    assert lr_at(50, schedule="constant", **KW) == 6e-4


def test_no_warmup_starts_at_peak():
    assert lr_at(0, max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, schedule="step", **KW)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2} and len(decay["params"]) == 2
    assert {p.dim() for p in no_decay["params"]} == {1} and len(no_decay["params"]) == 3
    assert math.isclose(sum(p.numel() for g in (decay, no_decay) for p in g["params"]),
                        sum(p.numel() for p in model.parameters()))
