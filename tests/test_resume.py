"""Resume on real DeepSpeed processes (tiny preset, CPU, gloo): exact resume, and resume under another
ZeRO stage and rank count through DeepSpeed's universal checkpoint.

The reference is one uninterrupted 2-rank ZeRO-2 bf16 run of 6 steps. A run paused with
--stop-after-steps (same LR schedule) and resumed with --resume auto must reproduce its per-step
loss, lr and grad norm bitwise; a checkpoint whose data cursor is reset must not (so the cursor
restore is what makes it exact). Params and Adam moments are compared after each load by a probe
that builds the engine the way pretrain does and dumps DeepSpeed's full fp32 views.
"""
import json
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARGS, curve, events, run_cli, step_records, warmup_cosine

STEPS = 6
ARGS = [*TINY_ARGS, "--global-batch", "8", "--max-steps", str(STEPS), "--save-every", "3", "--keep-last", "0",
        "--no-tracking"]


def pretrain(data, out, ds_config, ranks, *extra, check=True):
    return run_cli(["pretrain", *ARGS, "--data", str(data), "--out", str(out), "--ds-config", ds_config, *extra],
                   ranks=ranks, check=check, timeout=900)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: 2 ranks, ZeRO-2 bf16, 6 steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    pretrain(data, run, "zero2_bf16", 2)
    assert [r["step"] for r in step_records(run)] == list(range(1, STEPS + 1))
    return run


def test_resuming_a_mid_run_checkpoint_equals_uninterrupted_bitwise(data, reference, tmp_path):
    """The default-run check (one launch): continue the reference's step-3 checkpoint in a new run dir."""
    run = tmp_path / "run"
    proc = pretrain(data, run, "zero2_bf16", 2, "--resume", str(reference / "checkpoints" / "step_0000003"))
    assert "at step 3" in proc.stdout
    assert [r["step"] for r in step_records(run)] == [4, 5, 6]
    for key in ("loss", "lr", "grad_norm"):
        assert curve(run, key) == curve(reference, key)[3:], key  # bitwise: == on floats


@pytest.mark.slow
def test_paused_and_resumed_run_equals_uninterrupted_bitwise(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = pretrain(data, run, "zero2_bf16", 2, "--stop-after-steps", "2", "--json")
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    assert result["stopped"] == "--stop-after-steps" and result["step"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    proc = pretrain(data, run, "zero2_bf16", 2, "--resume", "auto")
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in proc.stdout
    for key in ("loss", "lr", "grad_norm"):
        assert curve(run, key) == curve(reference, key), key  # bitwise: == on floats


def test_changed_optimizer_settings_take_effect_on_resume(data, tmp_path):
    """DeepSpeed restores the checkpoint's lr, betas, eps and weight decay; the run's flags must win from the
    resume step on (the rollback advice is "lower --lr and resume"), and the run says what changed."""
    run = tmp_path / "run"
    pretrain(data, run, "zero2_bf16", 1, "--stop-after-steps", "3")
    proc = pretrain(data, run, "zero2_bf16", 1, "--lr", "1e-3", "--min-lr", "1e-4", "--beta2", "0.99", "--eps", "1e-6",
                    "--weight-decay", "0.05", "--max-steps", "8", "--muon-lr", "0.05")  # (no Muon: not reported)
    assert ("resuming with changed settings, in effect from step 4: lr 0.003 -> 0.001; min-lr 0.0003 -> 0.0001; "
            "beta2 0.95 -> 0.99; eps 1e-08 -> 1e-06; weight-decay 0.1 -> 0.05; run length 6 -> 8 steps (the LR "
            "schedule now ends at step 8)") in proc.stdout
    starts = [e["hyperparameters"] for e in events(run) if e["event"] == "start"]
    decay, no_decay = starts[1]["decay"], starts[1]["no_decay"]  # read from the optimizer DeepSpeed steps with
    assert (decay["betas"], decay["eps"], decay["weight_decay"]) == ([0.9, 0.99], 1e-6, 0.05)
    assert (no_decay["betas"], no_decay["eps"], no_decay["weight_decay"]) == ([0.9, 0.99], 1e-6, 0.0)
    assert decay["lr"] == pytest.approx(warmup_cosine(3, 1e-3, 1e-4, 8), rel=1e-12)
    applied = curve(run, "lr")
    assert applied == pytest.approx([warmup_cosine(s, 3e-3, 3e-4, 6) for s in range(3)] +
                                    [warmup_cosine(s, 1e-3, 1e-4, 8) for s in range(3, 8)], rel=1e-12)


PROBE = textwrap.dedent('''
    """Build the engine as pretrain does for CKPT under DS_CONFIG on this many ranks, load, dump fp32 views."""
    import sys
    from pathlib import Path

    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    import models
    from trainer import checkpoint, dist
    from trainer.engine import build as ds_engine
    from trainer.engine.ds_config import build_ds_config, load_ds_config
    from trainer.config import TrainConfig
    from trainer.train.optim import param_groups

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    ckpt, ds_spec, out = Path(args[0]), args[1], args[2]
    ds_engine.init_distributed()
    client = torch.load(checkpoint.model_states_file(ckpt), map_location="cpu", weights_only=False)
    cfg, world = TrainConfig(**client["train_config"]), dist.world_size()
    accum = client["global_batch"] // (cfg.micro_batch * world)
    ds = build_ds_config(load_ds_config(ds_spec), micro_batch=cfg.micro_batch, grad_accum=accum,
                                   world_size=world, grad_clip=cfg.grad_clip, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                   eps=cfg.eps, weight_decay=cfg.weight_decay)
    load_path, ds = checkpoint.prepare_resume(ckpt, world, ds, client["global_batch"])
    torch.manual_seed(12345)  # different init: everything must come from the checkpoint
    model = models.GPT(models.ModelConfig.from_dict(client["model_config"]))
    engine = ds_engine.initialize(model, param_groups(model, cfg.weight_decay), ds)
    loaded = checkpoint.load(engine, ckpt, load_path)
    # DeepSpeed links the per-parameter views of the Adam state lazily, at the first step; link them now.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    dump = {"step": loaded["step"]}  # the LR is a function of the step (trainer/train/optim.py)
    for name, p in engine.module.named_parameters():
        dump[name] = [safe_get_full_fp32_param(p).float()] + [
            safe_get_full_optimizer_state(p, k).float() for k in ("exp_avg", "exp_avg_sq")]
    if dist.is_main():
        torch.save(dump, out)
''')


def probe(ckpt: Path, ds_config: str, ranks: int, tmp_path: Path) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / f"probe_{ckpt.name}_{ds_config}_{ranks}.pt"
    run_cli([str(ckpt), ds_config, str(out)], ranks=ranks, script=script, timeout=900)
    return torch.load(out, weights_only=False)


def max_diff(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys()
    worst = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for name in a:
        if name == "step":
            continue
        for kind, x, y in zip(worst, a[name], b[name]):
            worst[kind] = max(worst[kind], (x - y).abs().max().item())
    return worst


@pytest.mark.slow
def test_zero2_two_ranks_to_zero1_one_rank_and_back(data, reference, tmp_path):
    run = tmp_path / "run"
    pretrain(data, run, "zero2_bf16", 2, "--stop-after-steps", "2")
    proc = pretrain(data, run, "zero1_bf16", 1, "--stop-after-steps", "2")
    assert "saved under ZeRO-2 bf16 on 2 ranks, resuming under ZeRO-1 bf16 on 1 rank" in proc.stdout
    assert (run / "checkpoints" / "step_0000002" / "universal" / "COMPLETE").is_file()
    proc = pretrain(data, run, "zero2_bf16", 2)
    assert "saved under ZeRO-1 bf16 on 1 rank, resuming under ZeRO-2 bf16 on 2 ranks" in proc.stdout
    assert curve(run, "lr") == curve(reference, "lr")
    assert curve(run, "loss") == pytest.approx(curve(reference, "loss"), abs=1e-2)
    assert curve(run, "grad_norm") == pytest.approx(curve(reference, "grad_norm"), rel=1e-2)
    diffs = [abs(a - b) for a, b in zip(curve(run, "loss"), curve(reference, "loss"))]
    print("loss max diff vs uninterrupted:", max(diffs))

    # Params and Adam moments after each conversion equal those of a native load of the same checkpoint.
    ckpts = run / "checkpoints"
    for ckpt, native, native_ranks, other, other_ranks in (
            (ckpts / "step_0000002", "zero2_bf16", 2, "zero1_bf16", 1),
            (ckpts / "step_0000004", "zero1_bf16", 1, "zero2_bf16", 2)):
        a, b = probe(ckpt, native, native_ranks, tmp_path), probe(ckpt, other, other_ranks, tmp_path)
        diffs = max_diff(a, b)
        print(ckpt.name, native, "->", other, diffs)
        assert a["step"] == b["step"]
        assert diffs == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}


@pytest.mark.slow
def test_resetting_the_data_cursor_breaks_exact_resume(data, reference, tmp_path):
    """The control for the exact-resume test: same weights, optimizer, RNG and schedule, cursor back to 0."""
    run = tmp_path / "run"
    pretrain(data, run, "zero2_bf16", 2, "--stop-after-steps", "3")
    states_file = run / "checkpoints" / "step_0000003" / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, weights_only=False)
    assert states["cursor"] == 24
    states["cursor"] = 0
    torch.save(states, states_file)
    pretrain(data, run, "zero2_bf16", 2)
    assert curve(run, "lr") == curve(reference, "lr")
    assert curve(run, "loss")[:3] == curve(reference, "loss")[:3]
    assert all(a != b for a, b in zip(curve(run, "loss")[3:], curve(reference, "loss")[3:]))


@pytest.mark.slow
def test_resume_errors_are_one_line(data, reference, tmp_path):
    proc = pretrain(data, tmp_path / "x", "zero2_bf16", 1, "--resume", str(reference / "nope"), check=False)
    assert proc.returncode != 0 and "Error: --resume" in proc.stderr and "Traceback" not in proc.stderr
    proc = pretrain(data, tmp_path / "y", "zero0_bf16", 1, "--resume", str(reference), check=False)
    assert proc.returncode != 0 and "does not cover ZeRO-0" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_zero0_resumes_on_another_rank_count_as_is(data, tmp_path):
    """ZeRO-0 keeps the whole optimizer state on every rank: 2 ranks -> 1 rank needs no conversion."""
    reference = tmp_path / "ref"
    pretrain(data, reference, "zero0_bf16", 2)
    run = tmp_path / "run"
    pretrain(data, run, "zero0_bf16", 2, "--stop-after-steps", "3")
    proc = pretrain(data, run, "zero0_bf16", 1)
    assert "ZeRO-0 state is not partitioned, loading it as is" in proc.stdout
    for key in ("loss", "lr", "grad_norm"):
        assert curve(run, key) == curve(reference, key), key


@pytest.mark.slow
def test_a_checkpoint_of_deepspeeds_fused_adam_resumes_with_torchs_adamw(data, tmp_path):
    """Runs made before torch's AdamW became the default hold DeepSpeed FusedAdam's state (its step count a
    Python int): resumed under zero2_bf16 it continues with its moments. Same fp32 math in another kernel,
    so the losses agree to ~1e-4; had the moments been lost, step 6 would be off by ~5e-2."""
    old, new = tmp_path / "fused", tmp_path / "torch"
    pretrain(data, old, "zero2_fusedadam_bf16", 1, "--max-steps", "8", "--save-every", "4")  # builds the op once
    pretrain(data, new, "zero2_bf16", 1, "--max-steps", "8", "--resume", str(old / "checkpoints" / "step_0000004"))
    assert curve(new, "loss") == pytest.approx(curve(old, "loss")[4:], abs=1e-3)
    assert curve(new, "lr") == curve(old, "lr")[4:]
