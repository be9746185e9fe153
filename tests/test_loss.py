"""models/loss.py: the chunked loss our GPT computes from its head's input equals the fp32 cross-entropy
of the logits (value and gradients), for every reduction, ignored tokens, padded vocabularies and
chunk sizes; and the trainer, eval-ppl and hellaswag all score with it."""
import pytest
import torch
import torch.nn.functional as F

import models
from models.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy


def _inputs(n=37, c=24, vp=128, v=120, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, dtype=dtype)
    weight = torch.randn(vp, c, generator=g, dtype=dtype) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[3, 10, 11]] = IGNORE_INDEX
    return hidden, weight, targets


def _reference(hidden, weight, targets, v, reduction):
    return F.cross_entropy(F.linear(hidden, weight)[:, :v].double(), targets, ignore_index=IGNORE_INDEX,
                           reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [0, 1, 5, 37, 100])
def test_equals_cross_entropy_of_the_logits_value_and_gradients(reduction, chunk):
    v = 120
    h, w, t = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, t, reduction, vocab_size=v, chunk_tokens=chunk)
    ref = _reference(h2, w2, t, v, reduction)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    upstream = torch.linspace(0.5, 2.0, t.numel(), dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    (ours.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-9)
    assert w1.grad[v:].abs().max() == 0  # pad rows: never scored, never trained
    assert ours.shape == t.shape if reduction == "none" else ours.dim() == 0
    if reduction == "none":
        assert (ours[t == IGNORE_INDEX] == 0).all()


def test_bf16_as_accurate_as_the_logits_path():
    """In bf16 the chunked loss and gradients are as close to the fp64 truth as the plain path's."""
    v = 1000
    h64, w64, t = _inputs(n=300, c=64, vp=1024, v=v)
    truth_h, truth_w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    truth = _reference(truth_h, truth_w, t, v, "mean")
    truth.backward()
    errors = {}
    for name in ("chunked", "logits"):
        h, w = h64.bfloat16().requires_grad_(), w64.bfloat16().requires_grad_()
        loss = linear_cross_entropy(h, w, t, vocab_size=v) if name == "chunked" else \
            cross_entropy(F.linear(h, w)[:, :v], t)
        loss.backward()
        errors[name] = [abs(loss.item() - truth.item()),
                        ((h.grad.double() - truth_h.grad).norm() / truth_h.grad.norm()).item(),
                        ((w.grad.double() - truth_w.grad).norm() / truth_w.grad.norm()).item()]
    for ours, plain in zip(errors["chunked"], errors["logits"]):
        assert ours <= 1.5 * plain + 1e-6, errors


def test_no_gradient_state_under_no_grad_and_edge_cases():
    h, w, t = _inputs(dtype=torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w, t, "none")
    assert loss.grad_fn is None and loss.shape == t.shape
    assert torch.isnan(linear_cross_entropy(h, w, torch.full_like(t, IGNORE_INDEX)))  # nothing scored, like F
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, "avg")
    with pytest.raises(ValueError, match="vocab_size"):
        linear_cross_entropy(h, w, t, vocab_size=w.size(0) + 1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_equals_cross_entropy_of_the_capped_logits(reduction):
    v, cap = 120, 2.0  # a small cap, so that tanh bends most logits of these inputs
    h, w, t = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, t, reduction, vocab_size=v, chunk_tokens=5, softcap=cap)
    ref = F.cross_entropy((cap * torch.tanh(F.linear(h2, w2) / cap))[:, :v], t, ignore_index=IGNORE_INDEX,
                          reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("preset_overrides", [{}, {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope",
                                                   "bias": False, "tie_embeddings": False},
                                              {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False,
                                               "tie_embeddings": False, "qk_norm": True, "relu_squared": True,
                                               "logit_softcap": 3.0}], ids=["gpt2", "gpt25", "speedrun-options"])
def test_model_loss_equals_loss_of_its_logits(preset_overrides):
    cfg = models.get_config("tiny", vocab_size=300, padded_vocab_size=320, **preset_overrides)
    torch.manual_seed(0)
    model = models.GPT(cfg).double()
    x = torch.randint(0, 300, (3, 20))
    y = torch.randint(0, 300, (3, 20))
    logits = model(x)
    assert logits.shape == (3, 20, 300)
    torch.testing.assert_close(model(x, y), cross_entropy(logits, y))
    torch.testing.assert_close(model(x, y, reduction="none"), cross_entropy(logits, y, "none"))
    model(x, y).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-7, atol=1e-10, msg=n)
