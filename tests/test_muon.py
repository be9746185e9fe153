"""Muon through DeepSpeed on real engines (tiny preset, CPU, gloo), checked against a plain-PyTorch Muon.

The oracle is written here from the algorithm (Keller Jordan's Muon: Nesterov momentum, quintic
Newton-Schulz, the sqrt(rows / cols) scale, decoupled weight decay; torch's AdamW for embeddings,
norms and biases): every ZeRO stage must take the same steps as it. The other cases are what a user
relies on: pause and resume bitwise (ZeRO-0 on 1 rank, ZeRO-2 on 2 ranks), a universal resume onto
another stage and rank count, a non-finite step skipped without poisoning Muon's momentum, export.

To stay inside CI's time, the 1-rank runs share one process (`session`): DeepSpeed runs several
engines in one process, and torch.compile of DeepSpeed's Muon kernels is paid once. A resume in the
same process still starts a new engine from the checkpoint, CPU Adam's process-wide state included
(trainer/checkpoint/engine_io.py).
"""
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import curve, drive, equal_state, poisoned, run_cli, same, step_records, warmup_cosine

import models
from trainer.engine.ds_config import build_ds_config, load_ds_config
from trainer.errors import UserError
from trainer.train.optim import MUON, param_groups

ARGS = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "4", "--global-batch", "8", "--lr", "3e-3",
        "--min-lr", "3e-4", "--warmup-steps", "2", "--eval-every", "0", "--log-every", "1", "--seed", "7",
        "--no-tracking", "--keep-last", "0", "--muon-weight-decay", "0.05"]
ORACLE = ["--schedule", "constant", "--max-steps", "3", "--save-every", "3"]
# Resumed at step 7: the first step at which CPU Adam's running beta2^t (0.95) differs from pow(0.95, t), so the
# AdamW half resumes bitwise only with the replay in trainer/checkpoint/engine_io.py.
RESUME = ["--max-steps", "9", "--save-every", "7"]
PAUSE = 7
ORACLE_STAGES = {  # run name: (ZeRO stage, offload, --grad-clip)
    "z0": (0, False, "1.0"), "z1": (1, False, "0"), "z2": (2, False, "0"), "z3": (3, False, "0"),
    "z2_offload": (2, True, "0")}
BUILDS_AN_OP = ("z2_offload",)  # ZeRO-Offload's AdamW is DeepSpeed's CPU Adam, a C++ build: the extended suite


# ---- which parameters Muon gets -------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["gpt2", "gpt25"])
def test_muon_gets_the_block_matrices_and_adamw_the_rest(preset):
    config = models.get_config("tiny", **(models.config.GPT25 if preset == "gpt25" else {}))
    model = models.GPT(config)
    groups = {g["name"]: g for g in param_groups(model, 0.1, muon=True, muon_weight_decay=0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for p in groups[MUON]["params"]]
    expected = [n for n, p in model.named_parameters() if p.dim() == 2 and (".h." in n or ".layers." in n)]
    assert sorted(muon) == sorted(expected) and len(muon) == (7 if preset == "gpt25" else 4) * config.n_layer
    assert not any(k in n for n in muon for k in ("wte", "wpe", "embed", "lm_head", "norm", "ln_", "bias"))
    hidden = groups[MUON]["params"]  # already in the order DeepSpeed's Muon sorts its group into (ZeRO-0 export)
    assert [id(p) for p in sorted(hidden, key=lambda p: p.size(), reverse=True)] == [id(p) for p in hidden]
    assert groups[MUON]["use_muon"] and groups[MUON]["weight_decay"] == 0.05
    assert not groups["decay"]["use_muon"] and groups["decay"]["weight_decay"] == 0.1
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == model.num_params()


def test_adamw_groups_are_unchanged_without_muon():
    model = models.GPT(models.get_config("tiny"))
    groups = param_groups(model, 0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"] and all("use_muon" not in g for g in groups)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_muon_with_clipping_under_zero_1_2_3_is_refused(stage):
    """DeepSpeed clips Muon's orthogonalized update there (a 60x smaller step on 4 x 128): refuse, say how."""
    kwargs = dict(micro_batch=4, grad_accum=1, world_size=1, lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                  weight_decay=0.1)
    with pytest.raises(UserError, match=r"--grad-clip 0.*ZeRO-0"):
        build_ds_config(load_ds_config(f"zero{stage}_muon_bf16"), grad_clip=1.0, **kwargs)
    config = build_ds_config(load_ds_config(f"zero{stage}_muon_bf16"), grad_clip=0.0, muon_lr=0.05, **kwargs)
    assert config["optimizer"]["params"]["muon_lr"] == 0.05 and config["gradient_clipping"] == 0.0
    build_ds_config(load_ds_config("zero0_muon_bf16"), grad_clip=1.0, **kwargs)  # ZeRO-0 clips the gradients


# ---- the runs ----------------------------------------------------------------------------------------

def two_ranks(*args):
    return run_cli(["pretrain", *ARGS, *args], ranks=2, timeout=900)


def fp32_config(tmp: Path, stage: int, offload: bool) -> Path:
    zero = {"stage": stage, **({"reduce_scatter": False} if stage == 3 else {}),
            **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    path = tmp / f"zero{stage}{'_offload' * offload}_muon_fp32.json"
    path.write_text(json.dumps({"zero_optimization": zero, "optimizer": {"type": "Muon", "params": {}}}))
    return path


def oracle_jobs(data, tmp: Path, names) -> list:
    """(name, pretrain args) of the ORACLE runs `names` (fp32 configs of each ZeRO stage)."""
    return [(name, [*ARGS, *ORACLE, "--data", str(data), "--out", str(tmp / name), "--grad-clip", clip,
                    "--ds-config", str(fp32_config(tmp, stage, offload))])
            for name, (stage, offload, clip) in ORACLE_STAGES.items() if name in names]


@pytest.fixture(scope="module")
def ref2(data, tmp_path_factory):
    """The reference bf16 run: ZeRO-2 on 2 ranks, 9 steps, checkpoints at 7 and 9."""
    run = tmp_path_factory.mktemp("ref2") / "run"
    two_ranks("--data", str(data), "--out", str(run), "--ds-config", "zero2_muon_bf16", "--grad-clip", "0", *RESUME)
    return run


def in_one_process(runs: list, tmp: Path) -> dict:
    """Run the 1-rank `runs` (name, args) in one process: {name: run dir}, plus "errors": {name: error or None}."""
    results = drive([{"name": name, "pretrain": args} for name, args in runs], tmp)
    return {"errors": {name: results[name].get("error") for name, _ in runs}, **{name: tmp / name for name, _ in runs}}


@pytest.fixture(scope="module")
def session(data, tmp_path_factory):
    """The fast suite's 1-rank runs: the oracle runs of each ZeRO stage, a ZeRO-0 reference and its resume, a
    refused clip."""
    tmp = tmp_path_factory.mktemp("session")
    runs = oracle_jobs(data, tmp, [name for name in ORACLE_STAGES if name not in BUILDS_AN_OP])
    bf16 = [*ARGS, *RESUME, "--data", str(data), "--ds-config", "zero0_muon_bf16"]
    runs += [("z0_ref", [*bf16, "--out", str(tmp / "z0_ref")]),
             ("z0_resumed", [*bf16, "--out", str(tmp / "z0_resumed"),
                             "--resume", str(tmp / "z0_ref" / "checkpoints" / f"step_{PAUSE:07d}")]),
             ("clip_refused", [*ARGS, *RESUME, "--data", str(data), "--ds-config", "zero2_muon_bf16",
                               "--grad-clip", "1.0", "--out", str(tmp / "clip_refused")])]
    return in_one_process(runs, tmp)


@pytest.fixture(scope="module")
def more(data, ref2, session, tmp_path_factory):
    """The extended suite's 1-rank runs: a changed Muon lr on resume, a universal resume of the 2-rank run, and
    a poisoned step under ZeRO-0 and ZeRO-2."""
    tmp = tmp_path_factory.mktemp("more")
    runs = [("z0_new_muon_lr", [*ARGS, *RESUME, "--data", str(data), "--ds-config", "zero0_muon_bf16", "--out",
                                str(tmp / "z0_new_muon_lr"), "--muon-lr", "0.01",
                                "--resume", str(session["z0_ref"] / "checkpoints" / f"step_{PAUSE:07d}")]),
            ("universal", [*ARGS, *RESUME, "--data", str(data), "--ds-config", "zero1_muon_bf16", "--grad-clip", "0",
                           "--out", str(tmp / "universal"),
                           "--resume", str(ref2 / "checkpoints" / f"step_{PAUSE:07d}")])]
    nan_data, nan_model = poisoned(data, tmp / "nan", steps=[3])
    for name, ds, clip in (("nan_z0", "zero0_muon_bf16", "1.0"), ("nan_z2", "zero2_muon_bf16", "0")):
        runs.append((name, [*ARGS, "--max-steps", "5", "--save-every", "1", "--data", str(nan_data), "--init-from",
                            str(nan_model), "--set", "tie_embeddings=false", "--ds-config", ds, "--grad-clip", clip,
                            "--out", str(tmp / name)]))
    result = in_one_process(runs, tmp)
    assert all(error is None for error in result["errors"].values()), result["errors"]
    return result


def weights(run: Path, step: int) -> dict:
    from trainer.checkpoint import consolidated_state_dict

    return consolidated_state_dict(run / "checkpoints" / f"step_{step:07d}")[0]


# ---- the oracle: a plain-PyTorch Muon + AdamW --------------------------------------------------------

def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration of Keller Jordan's Muon: about U V^T for G = U S V^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def plain_muon_run(data, steps: int, clip: float, lr=3e-3, muon_lr=0.02, wd=0.1, muon_wd=0.05, momentum=0.95):
    """(per-step losses, final state dict) of the ORACLE run, in plain PyTorch and fp32."""
    from trainer.data.shards import Dataset, TrainStream

    dataset = Dataset.open(data)
    torch.manual_seed(7)
    model = models.GPT(models.get_config("tiny", vocab_size=dataset.vocab_size, padded_vocab_size=320))
    hidden = [p for p in model.blocks.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() == 2], "weight_decay": wd},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.95), eps=1e-8)
    buffers = [torch.zeros_like(p) for p in hidden]
    stream = TrainStream(dataset, 64, 8, seed=7)
    losses = []
    for step in range(steps):
        scale = min(1.0, (step + 1) / 2)  # 2 warmup steps, then constant
        x, y = stream.local_batch(step * 8, 0, 1)
        total = 0.0
        for rows in (slice(0, 4), slice(4, 8)):  # two micro-batches of 4, gradients averaged
            loss = model(x[rows], y[rows])
            (loss / 2).backward()
            total += loss.item() / 2
        losses.append(total)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with torch.no_grad():
            for p, buf in zip(hidden, buffers):
                buf.mul_(momentum).add_(p.grad, alpha=1 - momentum)
                update = newton_schulz((1 - momentum) * p.grad + momentum * buf)  # Nesterov
                update *= math.sqrt(max(1.0, p.size(0) / p.size(1)))
                p.mul_(1 - muon_lr * scale * muon_wd)
                p.add_(update, alpha=-muon_lr * scale)
            for group in adamw.param_groups:
                group["lr"] = lr * scale
            adamw.step()
        model.zero_grad(set_to_none=True)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def oracle(data):
    return {clip: plain_muon_run(data, 3, clip) for clip in (1.0, 0.0)}


@pytest.mark.parametrize("name", [name for name in ORACLE_STAGES if name not in BUILDS_AN_OP])
def test_every_zero_stage_takes_the_plain_pytorch_muon_steps(session, oracle, name):
    """Losses and fp32 weights after 3 steps (warmup, accumulation over 2 micro-batches, clipping on
    ZeRO-0) equal the plain-PyTorch Muon's up to fp32 rounding: the Muon update, its learning rate and
    the split between Muon and AdamW are what the recipe says, under every stage."""
    assert_takes_the_oracle_steps(session[name], oracle, name)


@pytest.mark.extended
def test_zero2_offload_takes_the_plain_pytorch_muon_steps(data, oracle, tmp_path):
    """As above, with the optimizer offloaded (DeepSpeed's CPU Adam for the AdamW half, built on first use)."""
    results = drive([{"name": name, "pretrain": args} for name, args in oracle_jobs(data, tmp_path, BUILDS_AN_OP)],
                    tmp_path)
    for name in BUILDS_AN_OP:
        assert results[name].get("error") is None, results[name]
        assert_takes_the_oracle_steps(tmp_path / name, oracle, name)


def assert_takes_the_oracle_steps(run: Path, oracle: dict, name: str) -> None:
    losses, expected = oracle[float(ORACLE_STAGES[name][2])]
    assert curve(run, "loss") == pytest.approx(losses, abs=1e-5)
    assert curve(run, "muon_lr") == pytest.approx([0.01, 0.02, 0.02])
    ours = weights(run, 3)
    worst = max((ours[k].float() - v).abs().max().item() for k, v in expected.items())
    assert worst <= 2e-5, f"{name}: weights differ from the plain-PyTorch Muon by up to {worst:.2e}"


def test_clipping_under_zero2_is_one_error_line(session):
    error = session["errors"]["clip_refused"]
    assert error is not None and "\n" not in error and "--grad-clip 0" in error
    assert all(session["errors"][name] is None for name in session["errors"] if name != "clip_refused")


def test_zero0_pause_and_resume_is_bitwise(session):
    ref, resumed = session["z0_ref"], session["z0_resumed"]
    for key in ("loss", "lr", "muon_lr", "grad_norm"):
        assert curve(resumed, key) == curve(ref, key)[PAUSE:], key
    assert equal_state(weights(resumed, 9), weights(ref, 9))


@pytest.mark.extended
def test_both_rates_follow_one_schedule_and_a_changed_muon_lr_applies_on_resume(session, more):
    """lr and muon_lr are the same warmup + cosine (written out here, not taken from trainer/train/optim.py), scaled
    to --lr and --muon-lr; resuming with another --muon-lr changes Muon's rate from the next step on."""
    def rate(step, peak):  # linear warmup over 2 steps, then cosine to a tenth of the peak at step 9
        return warmup_cosine(step, peak, peak / 10, total=9)

    assert curve(session["z0_ref"], "lr") == pytest.approx([rate(s, 3e-3) for s in range(9)])
    assert curve(session["z0_ref"], "muon_lr") == pytest.approx([rate(s, 0.02) for s in range(9)])
    assert curve(more["z0_new_muon_lr"], "muon_lr") == pytest.approx([rate(s, 0.01) for s in range(PAUSE, 9)])
    assert curve(more["z0_new_muon_lr"], "lr") == curve(session["z0_ref"], "lr")[PAUSE:]


def test_zero2_two_ranks_pause_and_resume_is_bitwise(data, ref2, tmp_path):
    run = tmp_path / "resumed"
    two_ranks("--data", str(data), "--out", str(run), "--ds-config", "zero2_muon_bf16", "--grad-clip", "0", *RESUME,
              "--resume", str(ref2 / "checkpoints" / f"step_{PAUSE:07d}"))
    for key in ("loss", "lr", "muon_lr"):
        assert curve(run, key) == curve(ref2, key)[PAUSE:], key
    assert equal_state(weights(run, 9), weights(ref2, 9))


@pytest.mark.extended
def test_universal_resume_onto_zero1_one_rank_carries_weights_and_adamw(more, ref2):
    """ZeRO-2 x 2 ranks -> ZeRO-1 x 1 rank. The first step after the load sees the checkpoint's weights and
    AdamW state (same loss); Muon's momentum restarts from zero (DeepSpeed's universal format has no place
    for it), so the next steps differ a little, no more than bf16 runs on other rank counts do."""
    run = more["universal"]
    assert curve(run, "lr") == curve(ref2, "lr")[PAUSE:]
    assert curve(run, "loss")[0] == pytest.approx(curve(ref2, "loss")[PAUSE], abs=1e-3)
    assert curve(run, "loss") == pytest.approx(curve(ref2, "loss")[PAUSE:], abs=2e-2)


@pytest.mark.extended
@pytest.mark.parametrize("name", ["nan_z0", "nan_z2"])
def test_a_nonfinite_step_is_skipped_and_leaves_weights_and_momentum_alone(more, name):
    run = more[name]
    steps = step_records(run)
    assert [r["skipped"] for r in steps] == [0, 0, 1, 1, 1] and all(math.isfinite(r["loss"]) for r in steps[3:])
    assert not math.isfinite(steps[2]["loss"])
    before, after = weights(run, 2), weights(run, 3)
    assert before.keys() == after.keys()
    assert all(same(before[k], after[k]) for k in before)  # (the poisoned embedding row stays NaN)
    assert steps[4]["loss"] < steps[0]["loss"]
    momentum = [_muon_momentum(run / "checkpoints" / f"step_{s:07d}") for s in (2, 3)]
    assert torch.equal(*momentum) and torch.isfinite(momentum[1]).all()


def _muon_momentum(ckpt: Path) -> torch.Tensor:
    """The Muon group's momentum as the checkpoint stores it (ZeRO-0: per parameter; ZeRO-2: one flat buffer)."""
    files = sorted(ckpt.glob("*optim_states.pt"))
    if files:
        state = torch.load(files[0], weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
        return state[0]["momentum_buffer"].float()
    optimizer = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
    state = optimizer["optimizer_state_dict"]["state"]
    return torch.cat([s["momentum_buffer"].flatten().float() for s in state.values() if "momentum_buffer" in s])


def test_export_is_the_trained_model_and_loads_in_transformers(ref2, session, tmp_path):
    """zero_to_fp32 of a Muon run: DeepSpeed's consolidation, the tie kept, the same logits in transformers;
    ZeRO-0 bf16 (Muon's unfused wrapper) exports its fp32 master weights."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from tools import zero_to_fp32

    result = CliRunner().invoke(zero_to_fp32.main, [str(ref2), str(tmp_path / "hf"), "--hf", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["hf_class"] == "GPT2LMHeadModel" and summary["logits_max_abs_diff"] <= 1e-4
    result = CliRunner().invoke(zero_to_fp32.main, [str(session["z0_ref"]), str(tmp_path / "z0")])
    assert result.exit_code == 0, result.output
    written = load_file(str(tmp_path / "z0" / "model.safetensors"))
    module = torch.load(session["z0_ref"] / "checkpoints" / "step_0000009" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert all(torch.equal(written[k].bfloat16(), module[k]) for k in written)  # the masters round to the weights
    assert any(not torch.equal(written[k], module[k].float()) for k in written)  # and carry more than bf16


# ---- Newton-Schulz batched over same-shape matrices (trainer/engine/muon.py) ---------------------------

def test_batched_updates_equal_deepspeeds_one_matrix_at_a_time(ns_method="standard", dtype=torch.bfloat16):
    """The batched path gives DeepSpeed's muon_update for every matrix: the same momentum and Nesterov blend
    (elementwise), the same orthogonalized update up to the batched matmuls' rounding; a matrix whose
    gradient is not finite keeps its momentum and passes the non-finite values on (the step is skipped).
    (bf16 standard iteration, what CPU bf16 runs use; the ZeRO-1/2 oracle runs above take the batched path
    with DeepSpeed's fp32 gram iteration.)"""
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    from trainer.engine.muon import batched_muon_updates

    generator = torch.Generator().manual_seed(0)
    shapes = [(32, 32)] * 4 + [(96, 32)] * 3 + [(32, 96)] * 2
    grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads[5][1, 2] = float("nan")
    momenta = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    theirs_g, theirs_m = [g.clone() for g in grads], [m.clone() for m in momenta]
    theirs = [muon_update(g, m, 0.95, ns_method=ns_method) for g, m in zip(theirs_g, theirs_m)]
    ours = batched_muon_updates(grads, momenta, 0.95, ns_method)
    tolerance = 2 * torch.finfo(dtype).eps  # a rounding step or two of values of order one
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.allclose(momenta[i], theirs_m[i], atol=tolerance, rtol=0), i
        assert torch.allclose(grads[i], theirs_g[i], atol=tolerance, rtol=0, equal_nan=True), i
        if i == 5:
            assert not torch.isfinite(a).all() and not torch.isfinite(b).all()
            continue
        assert torch.allclose(a.float(), b.float(), atol=4 * tolerance, rtol=0), (i, (a - b).abs().max())
