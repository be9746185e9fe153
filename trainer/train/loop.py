"""The training loop shared by pretraining (trainer/train/pretrain.py) and fine-tuning
(trainer/sft/finetune.py): build a run (data, model, DeepSpeed engine, checkpoints, log), then the loop.

A `Task` says where a run's data and model shape come from; everything else (engine, checkpoints,
resume, recovery, stop policy, log) is shared. A data source (trainer/data/shards.py's Dataset: token
shards; trainer/sft/data.py: instruction data) makes the train and val streams and says what
checkpoints record about it.

The loop (`train`) follows DeepSpeed's idiom for each micro-batch, `engine(x, y)` (the model's own
loss, models/loss.py, the one eval-ppl scores), `engine.backward`, `engine.step`; DeepSpeed scales
for accumulation and steps the optimizer on accumulation boundaries. After each optimizer step every
component decides for itself whether the step is its turn: the log, the non-finite-step guard
(trainer/train/recovery.py), validation, HellaSwag, the stop policy (trainer/train/stop.py) and the checkpointer
(trainer/checkpoint/). The learning rate is set by the trainer before every step (trainer/train/optim.py).
"""
import dataclasses
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import models
from trainer import dist
from trainer.checkpoint import Checkpointer, contents
from trainer.config import TrainConfig, save_yaml
from trainer.data.prefetch import Batches, document_segments
from trainer.data.shards import Dataset, TrainStream, ValStream
from trainer.engine import build as ds_engine
from trainer.engine.ds_config import (
    OptimizerImpl,
    build_ds_config,
    default_grad_clip,
    load_ds_config,
    muon_update_in_grad_norm,
    optimizer_implementation,
    resolve_ds_config_path,
    uses_muon,
)
from trainer.errors import UserError
from trainer.train import determinism, hostmem, recovery
from trainer.train.batching import BatchPlan, choose_micro_batch, plan_batches, total_steps
from trainer.train.metrics import peak_flops
from trainer.train.optim import (
    apply_hyperparameters,
    group_names,
    hyperparameters_in_effect,
    lr_at,
    param_groups,
    set_lr,
)
from trainer.train.runlog import RunLog
from trainer.train.state import TrainState
from trainer.train.stop import StopPolicy
from trainer.train.validation import validation_loss

# Settings a resumed run may change; they take effect from the resume step (trainer/train/optim.py).
RESUMABLE_CHANGES = ("lr", "min_lr", "warmup_steps", "schedule", "decay_frac", "beta1", "beta2", "eps",
                     "weight_decay", "grad_clip", "muon_lr", "muon_momentum", "muon_weight_decay", "doc_masking")


def build_model(cfg: TrainConfig, model_cfg: "models.ModelConfig") -> "models.GPT":
    torch.manual_seed(cfg.seed)
    model = models.GPT(model_cfg)
    if cfg.init_from:
        from trainer.eval.modelio import load_weights_into

        load_weights_into(model, cfg.init_from)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


@dataclass(frozen=True)
class Task:
    """What distinguishes a kind of run; the loop, checkpoints and log are the same for every task."""
    name: str                   # "pretrain" | "finetune": the progress bar's label
    open_data: Callable         # (cfg) -> data source, called on every rank once torch.distributed is up
    model_config: Callable      # (cfg, data source) -> models.ModelConfig
    next_steps: Callable        # (run_dir) -> command lines printed when the run ends


@dataclass
class Run:
    """Everything the loop works with."""
    cfg: TrainConfig
    task: Task
    dataset: Dataset              # the data source: shards here, instruction data in finetune
    model_cfg: "models.ModelConfig"
    plan: BatchPlan
    stream: TrainStream
    batches: Batches              # this rank's share of each global batch, read ahead on a GPU (data/prefetch.py)
    val: ValStream
    total_steps: int
    engine: object
    groups: list                  # parameter group names, in the optimizer's order
    muon: bool                    # DeepSpeed's Muon for the hidden matrices (train/optim.py), AdamW for the rest
    optimizer: OptimizerImpl      # the code that runs (engine/ds_config.py: optimizer_implementation)
    grad_norm_reported: bool      # False where DeepSpeed's norm is no gradient norm (muon_update_in_grad_norm)
    compile_pending: bool         # torch.compile is set up and compiles at the next step (trainer/engine/build.py)
    state: TrainState
    checkpointer: Checkpointer
    stop: StopPolicy
    log: Optional[RunLog] = None
    hellaswag: object = None      # trainer.train.periodic.PeriodicHellaSwag, or None
    last_val: Optional[float] = None

    @property
    def device(self):
        return self.engine.device

    def lr_at(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, max_lr=c.lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps, total_steps=self.total_steps,
                     schedule=c.schedule, decay_frac=c.decay_frac)

    def set_lr(self, step: int) -> tuple[float, Optional[float]]:
        """Put step `step`'s rates into the optimizer and return them: lr, and the Muon group's rate (the
        same schedule, scaled to peak at --muon-lr; None without Muon)."""
        lr = self.lr_at(step)
        muon_lr = lr * self.cfg.muon_lr / self.cfg.lr if self.muon else None
        set_lr(self.engine.optimizer, self.groups, lr, muon_lr)
        return lr, muon_lr

    def apply_settings(self) -> None:
        """This run's betas, eps, weight decay, Muon momentum and AdamW implementation, into the optimizer; after
        every checkpoint load (resume, rollback), which brings back the saved ones."""
        c = self.cfg
        apply_hyperparameters(self.engine.optimizer, self.groups, betas=(c.beta1, c.beta2), eps=c.eps,
                              weight_decay=c.weight_decay, muon_momentum=c.muon_momentum,
                              muon_weight_decay=c.muon_weight_decay, adam_flags=self.optimizer.adam_flags,
                              muon_ns=self.optimizer.muon_ns)

    def client_state(self) -> dict:
        """What every checkpoint carries besides DeepSpeed's own state (trainer/checkpoint/contents.py)."""
        return contents.client_state(self.state, train_config=self.cfg, model_config=self.model_cfg,
                                     tokenizer=self.dataset.tokenizer_spec, world_size=dist.world_size(),
                                     zero_stage=self.engine.zero_optimization_stage(),
                                     global_batch=self.plan.global_batch, seq_len=self.plan.seq_len,
                                     total_steps=self.total_steps, data_state=self.dataset.client_state())


def setup(cfg: TrainConfig, task: Optional[Task] = None) -> Run:
    """Everything before the first step: process group, data, model, the checkpoint to resume (chosen before
    the engine, since another ZeRO setup builds the engine for a universal load), engine, state, timeline.
    `task` says where data and model shape come from (pretraining shards by default; trainer/sft/finetune.py).

    Every rank sets up from the same options and files, so a mistake found here is found by all of them
    alike: it is said once (UserError.every_rank), not once per rank, unless it is marked as one rank's."""
    if task is None:
        from trainer.train.pretrain import PRETRAIN as task
    try:
        return _setup(cfg, task)
    except UserError as e:
        if e.every_rank is None:
            e.every_rank = True
        raise


def _setup(cfg: TrainConfig, task: Task) -> Run:
    if cfg.deterministic:
        determinism.enable()
    ds_engine.init_distributed()
    world = dist.world_size()
    hostmem.keep_freed_memory(ds_engine.device())
    dataset = task.open_data(cfg)
    model_cfg = task.model_config(cfg, dataset)
    base_config = load_ds_config(cfg.ds_config)
    if cfg.micro_batch == "auto":
        cfg.micro_batch, how = choose_micro_batch(cfg, model_cfg, base_config, world, ds_engine.gpu_memory_gb())
        dist.print0(how)
    plan = plan_batches(cfg, model_cfg.block_size, world)
    stream = dataset.train_stream(plan.seq_len, plan.global_batch, cfg.seed)
    steps = total_steps(cfg, plan, stream)
    if cfg.grad_clip is None:
        cfg.grad_clip, why = default_grad_clip(base_config)
        if why:
            dist.print0(why)
    ds_config = build_ds_config(
        base_config, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
        world_size=world, grad_clip=cfg.grad_clip, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        weight_decay=cfg.weight_decay, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum)
    muon = uses_muon(ds_config)
    optimizer = optimizer_implementation(ds_config, ds_engine.device().type)  # refuses a bad JSON before the build
    model = build_model(cfg, model_cfg)

    # The resume decision comes before the engine: another rank count / ZeRO setup loads a universal copy.
    checkpointer = Checkpointer(cfg.out, cfg.save_every, cfg.keep_last)
    if checkpointer.choose(cfg.resume) is not None:
        ds_config = checkpointer.prepare(dataclasses.asdict(model_cfg), ds_config, world, plan.global_batch)
    groups = param_groups(model, cfg.weight_decay, muon=muon, muon_weight_decay=cfg.muon_weight_decay)
    engine = ds_engine.initialize(model, groups, ds_config)
    compiled = False
    auto_compile = engine.device.type == "cuda" and not cfg.deterministic
    if cfg.compile if cfg.compile is not None else auto_compile:
        blocker = ds_engine.compile_model(engine)
        compiled = blocker is None
        if blocker:
            dist.print0(f"{blocker}: training eagerly (--no-compile skips the attempt)")
    state = TrainState()
    if checkpointer.resume_from is not None:
        client = checkpointer.load(engine)
        state = contents.restore_train_state(client)
        dist.print0(f"resumed from {checkpointer.resume_from} at step {state.step} ({state.tokens:,} tokens seen)")
        _report_changes(client, cfg, steps, state.step, muon)
    checkpointer.start_timeline(state.step)
    run = Run(cfg=cfg, task=task, dataset=dataset, model_cfg=model_cfg, plan=plan, stream=stream,
              batches=Batches(stream, plan.global_batch, engine.device,
                              dataset.segments if cfg.doc_masking else None),
              val=dataset.val_stream(plan.seq_len, plan.micro_batch), total_steps=steps, engine=engine,
              groups=group_names(groups), muon=muon, optimizer=optimizer,
              grad_norm_reported=not muon_update_in_grad_norm(ds_config),
              compile_pending=compiled,
              state=state, checkpointer=checkpointer,
              stop=StopPolicy(cfg.max_time, cfg.stop_after_steps, state.step, engine.device))
    run.apply_settings()
    return run


def _report_changes(client: dict, cfg: TrainConfig, steps: int, step: int, muon: bool) -> None:
    """One line naming every setting that differs from the checkpoint's run; they apply from `step` on
    (Muon's settings only in a run with Muon: elsewhere they change nothing)."""
    saved = client.get("train_config") or {}
    changes = [f"{k.replace('_', '-')} {saved[k]} -> {getattr(cfg, k)}" for k in RESUMABLE_CHANGES
               if k in saved and saved[k] != getattr(cfg, k) and (muon or not k.startswith("muon_"))]
    saved_steps = client.get("total_steps", saved.get("max_steps"))
    if isinstance(saved_steps, int) and saved_steps != steps:
        changes.append(f"run length {saved_steps} -> {steps} steps (the LR schedule now ends at step {steps})")
    if changes:
        dist.print0(f"resuming with changed settings, in effect from step {step + 1}: {'; '.join(changes)}")
    if bool(saved.get("deterministic")) != cfg.deterministic:
        dist.print0("note: this run was trained with --deterministic and resumes without it: on a GPU its steps "
                    "from here differ from a deterministic continuation (pass --deterministic to keep it)"
                    if saved.get("deterministic") else
                    "note: this run was trained without --deterministic and resumes with it: its steps from here "
                    "repeat bit for bit, the ones before did not")


def start_log(run: Run) -> RunLog:
    """Write the run directory's config files and open the log (progress bar, metrics, TensorBoard)."""
    cfg, plan = run.cfg, run.plan
    run_dir = Path(cfg.out)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(dataclasses.replace(cfg, seq_len=plan.seq_len, grad_accum=plan.grad_accum, max_steps=run.total_steps),
                  run_dir / "config.yaml")
        (run_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(run.model_cfg), indent=2))
        run.dataset.record_in(run_dir)
    model = run.engine.module
    peak, peak_source = peak_flops(torch.bfloat16 if run.engine.bfloat16_enabled() else torch.float32) \
        if dist.is_main() else (0.0, "")
    log = RunLog(run_dir, cfg, run.total_steps, run.state.step, run.state.tokens, model.flops_per_token(plan.seq_len),
                 peak, dist.world_size(), run.device, desc=run.task.name)
    run.set_lr(run.state.step)
    resumed = run.checkpointer.resume_from
    log.event({"event": "start", "step": run.state.step, "resumed_from": str(resumed) if resumed else None,
               "total_steps": run.total_steps, "world_size": dist.world_size(),
               "zero_stage": run.engine.zero_optimization_stage(), "precision": _precision(run.engine),
               "hyperparameters": hyperparameters_in_effect(run.engine.optimizer, run.groups)})
    dist.print0(f"model {cfg.model or cfg.init_from}: {model.num_params():,} parameters | "
                f"data {run.dataset.describe()}")
    dist.print0(f"{dist.world_size()} rank(s) x micro-batch {plan.micro_batch} x grad-accum {plan.grad_accum} = "
                f"{plan.global_batch} sequences of {plan.seq_len} ({plan.tokens_per_step:,} tokens) per step | "
                f"ZeRO-{run.engine.zero_optimization_stage()} {_precision(run.engine)} "
                f"({resolve_ds_config_path(cfg.ds_config).name}) | {run.optimizer.label} | {run.total_steps} steps | "
                f"MFU vs {peak_source}")
    if run.muon:
        dist.print0(f"optimizer: Muon on the blocks' matrices (peak lr {cfg.muon_lr:g}, momentum "
                    f"{cfg.muon_momentum:g}, weight decay {cfg.muon_weight_decay:g}), AdamW on embeddings, head, "
                    f"norms and biases (peak lr {cfg.lr:g})"
                    + ("" if run.grad_norm_reported else "; grad_norm is not logged: under ZeRO-1/2/3 DeepSpeed's "
                       "norm measures Muon's update, not the gradient"))
    return log


def _precision(engine) -> str:
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def train_step(run: Run) -> tuple[torch.Tensor, bool]:
    """One optimizer step over the global batch; returns (mean loss of this rank's micro-batches, skipped).

    DeepSpeed averages the micro-batch losses over accumulation and ranks. With every target scored
    (pretraining) each micro-batch's mean loss is its share of the global batch's mean. With masked
    targets (fine-tuning) micro-batches score different numbers of tokens, so each one's summed loss is
    divided by the trained targets of the whole global batch (times accumulation x ranks, which the
    averaging divides out): the step minimises one token-weighted mean, whatever the split.
    """
    engine, plan, state = run.engine, run.plan, run.state
    x, y, segments = run.batches.at(state.cursor)
    scored = run.stream.scored_targets(state.cursor)  # None: every target is scored
    loss_sum = torch.zeros((), device=run.device)
    skipped_before = engine.skipped_steps
    for i in range(plan.grad_accum):
        rows = slice(i * plan.micro_batch, (i + 1) * plan.micro_batch)
        xb, yb = x[rows].to(run.device, non_blocking=True), y[rows].to(run.device, non_blocking=True)
        documents = document_segments(segments, rows, run.device)  # --doc-masking, where a window holds a boundary
        if scored is None:
            loss = engine(xb, yb, segments=documents)
        else:
            loss = engine(xb, yb, reduction="sum", segments=documents) * (plan.grad_accum * plan.world_size
                                                                          / max(scored, 1))
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
    skipped = engine.skipped_steps > skipped_before  # DeepSpeed skipped the update on every rank
    state.advance(plan.global_batch, plan.seq_len, skipped, trained=scored)
    return loss_sum / plan.grad_accum, skipped


def train(run: Run) -> str:
    """The loop; returns why it ended ("finished", a signal, "max-time reached", "--stop-after-steps")."""
    state, engine, cfg = run.state, run.engine, run.cfg
    while state.step < run.total_steps:
        started = time.perf_counter()
        lr, muon_lr = run.set_lr(state.step)
        compiling = run.compile_pending
        loss, skipped = first_compiled_step(run) if compiling else train_step(run)
        last = state.step >= run.total_steps
        grad_norm = engine.get_global_grad_norm() if run.grad_norm_reported else None
        run.log.step(state, loss, lr, grad_norm, skipped, last, muon_lr=muon_lr)
        if compiling:
            run.log.restart_clock(state)  # the compilation stays out of tokens/s
        if skipped:
            run.log.say(f"step {state.step}: non-finite gradients, update skipped on all ranks "
                        f"({state.skips_in_a_row} in a row, {state.skipped} in total)")
            if state.skips_in_a_row >= cfg.max_skips:
                ckpt = recovery.roll_back(run.checkpointer, engine, state, cfg.max_skips, cfg.max_rollbacks)
                run.apply_settings()
                run.log.event({"event": "rollback", "step": state.step, "checkpoint": ckpt.name,
                               "cursor": state.cursor})
                run.log.restart_window(state)
                continue  # no eval or save of the step just restored
        validate_if_due(run, last)
        hellaswag_if_due(run, last)
        # The compiling step is no measure of a step: --max-time keeps room for the slowest one of the others.
        step_seconds = 0.0 if compiling else time.perf_counter() - started
        reason = run.stop.reason(state.step, step_seconds, run.checkpointer.slowest_save)
        if reason or run.checkpointer.due(state.step, last):
            save(run)
        if reason and not last:
            return reason
    return "finished"


def first_compiled_step(run: Run) -> tuple[torch.Tensor, bool]:
    """The first step of a compiled run, which compiles: its time is logged (and kept out of tokens/s). If
    torch.compile fails in the first forward, before anything was applied, the run says so in one line and
    takes the step eagerly; a failure later in the step is an error (--no-compile avoids it)."""
    engine = run.engine
    micro_steps, started = engine.micro_steps, time.perf_counter()
    run.compile_pending = False
    try:
        result = train_step(run)
    except Exception as e:
        in_backward = any(frame.name == "backward" for frame in traceback.extract_tb(e.__traceback__))
        if not ds_engine.is_compile_error(e):
            raise
        if in_backward or engine.micro_steps != micro_steps:
            raise UserError(f"torch.compile failed during the first step ({ds_engine.describe_compile_error(e)}); "
                            "rerun with --no-compile", every_rank=True) from e
        ds_engine.uncompile(engine)
        run.log.say(f"torch.compile failed ({ds_engine.describe_compile_error(e)}): training eagerly (--no-compile "
                    "skips the attempt)")
        return train_step(run)
    seconds = time.perf_counter() - started
    run.log.event({"event": "compile", "step": run.state.step, "seconds": seconds})
    run.log.say(f"torch.compile: first step {seconds:.1f} s, compilation included (not counted in tokens/s)")
    return result


def validate_if_due(run: Run, last: bool) -> None:
    step, every = run.state.step, run.cfg.eval_every
    if not every or not (step % every == 0 or last):
        return
    with run.log.excluded() as timing:
        run.last_val = validation_loss(run.engine, run.val, run.cfg.eval_batches, run.device, run.batches.segments_of)
    run.log.record({"step": step, "val_loss": run.last_val, "eval_seconds": timing["seconds"]})
    run.log.say(f"step {step}: val_loss {run.last_val:.4f}")


def hellaswag_if_due(run: Run, last: bool) -> None:
    if run.hellaswag is None or not run.hellaswag.due(run.state.step, last):
        return
    with run.log.excluded() as timing:
        result = run.hellaswag.score(run.engine)
    run.log.record({"step": run.state.step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"],
                    "hellaswag_n": result["n"], "hellaswag_seconds": timing["seconds"]})
    run.log.say(f"step {run.state.step}: hellaswag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}, "
                f"{result['n']} examples)")


def save(run: Run) -> None:
    with run.log.excluded() as timing:
        path = run.checkpointer.save(run.engine, run.state.step, run.client_state())
    run.log.event({"event": "save", "step": run.state.step, "checkpoint": path.name, "seconds": timing["seconds"]})


def run(cfg: TrainConfig, json_output: bool = False, task: Optional[Task] = None) -> dict:
    """Train (or resume) the run `cfg` describes, on every rank of the launch.

    Args:
        cfg: the resolved run config (trainer.config.resolve: defaults < YAML < flags).
        json_output: print the result as one JSON line on stdout (rank 0).
        task: where data and model shape come from (None: pretraining on cfg.data's shards).

    Returns:
        {run_dir, step, tokens, loss, val_loss, skipped, stopped}; `stopped` says why the loop ended
        ("finished", "signal SIGTERM", "max-time reached", "--stop-after-steps").
    """
    r = setup(cfg, task)
    if cfg.hellaswag_every:
        from trainer.train.periodic import PeriodicHellaSwag

        r.hellaswag = PeriodicHellaSwag(cfg.hellaswag_jsonl, cfg.hellaswag_every, r.dataset.tokenizer_spec)
    r.log = start_log(r)
    try:  # any error below (a failed save, a rollback that gives up) leaves the bar closed, so `Error:` starts a line
        r.engine.train()
        stop_reason = train(r)
    except Exception as e:  # two failures of the kernels' own, as one line each
        explained = determinism.explain(e) if isinstance(e, RuntimeError) else None
        if explained is None and ds_engine.is_compile_error(e):  # a recompile (new shapes, evaluation) failed
            explained = UserError(f"torch.compile failed ({ds_engine.describe_compile_error(e)}); rerun with "
                                  "--no-compile (the run resumes from its last checkpoint)", every_rank=True)
        if explained is None:
            raise
        raise explained from e
    finally:
        r.log.close()
    result = {"run_dir": str(cfg.out), "step": r.state.step, "tokens": r.state.tokens, "loss": r.log.last_loss,
              "val_loss": r.last_val, "skipped": r.state.skipped, "stopped": stop_reason}
    if r.state.trained_tokens is not None:
        result["trained_tokens"] = r.state.trained_tokens
    result.update(r.dataset.summary())
    if dist.is_main():
        _print_summary(result, Path(cfg.out), stop_reason, r.task.next_steps(Path(cfg.out)))
        if json_output:
            print(json.dumps(result))
    return result


def _print_summary(result: dict, run_dir: Path, stop_reason: str, next_steps: list[str]) -> None:
    val = f", val loss {result['val_loss']:.4f}" if result["val_loss"] is not None else ""
    loss = f"{result['loss']:.4f}" if result["loss"] is not None else "n/a"
    print(f"\n{stop_reason} at step {result['step']} ({result['tokens']:,} tokens): loss {loss}{val}")
    print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, tb/, checkpoints/)")
    print("next:")
    for line in next_steps:
        print(f"  {line}")
