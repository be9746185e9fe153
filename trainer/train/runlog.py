"""The run's log: progress bar, metrics.jsonl / TensorBoard / W&B records, and throughput timing.

Throughput (tokens/s, MFU) counts training time only: evaluation, HellaSwag and checkpoint saves
run inside `excluded(...)`, which takes their time out of the current window and returns it, so
it is logged on its own: `eval_seconds` / `hellaswag_seconds` on those records in metrics.jsonl, a save's
`seconds` on its event in events.jsonl. On a GPU the
device is synchronised on entry, so queued training kernels are charged to training.
"""
import contextlib
import math
import time

import torch
from tqdm import tqdm

from trainer import dist
from trainer.train.metrics import MetricsWriter, memory_gb


class RunLog:
    def __init__(self, run_dir, cfg, total_steps: int, start_step: int, start_tokens: int, flops_per_token: float,
                 peak_flops: float, world_size: int, device, desc: str = "pretrain"):
        self.every = cfg.log_every
        self.flops_per_token, self.peak, self.world, self.device = flops_per_token, peak_flops, world_size, device
        # --no-tracking turns off TensorBoard and W&B; metrics.jsonl is part of the run directory and stays.
        self.writer = MetricsWriter(run_dir, enabled=dist.is_main(), tensorboard=cfg.tracking,
                                    wandb_project=cfg.wandb_project if cfg.tracking else None, config=cfg.to_dict())
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not dist.is_main(), dynamic_ncols=True,
                        desc=desc, unit="step")
        self.last_loss = None
        self._loss = torch.zeros((), device=device)
        self._steps = 0
        self._window_start(start_tokens)

    def _window_start(self, tokens: int) -> None:
        self._t0, self._tokens0, self._excluded = time.perf_counter(), tokens, 0.0

    def due(self, step: int, last: bool, skipped: bool) -> bool:
        return step % self.every == 0 or last or skipped

    def step(self, state, loss: torch.Tensor, lr: float, grad_norm, skipped: bool, last: bool,
             muon_lr: float = None) -> None:
        """Account one optimizer step; on logging steps write its record (loss averaged over the window;
        `muon_lr`, the Muon group's rate, only in runs with Muon)."""
        self._loss += loss
        self._steps += 1
        self.bar.update(1)
        if not self.due(state.step, last, skipped):
            return
        mean_loss = dist.all_reduce_mean(self._loss / self._steps).item()
        seconds = time.perf_counter() - self._t0 - self._excluded
        tokens_per_s = (state.tokens - self._tokens0) / max(seconds, 1e-9)
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.world) if self.peak else None
        grad_norm = float(grad_norm) if grad_norm is not None else None
        record = {"step": state.step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                  "tokens_per_s": tokens_per_s, "mfu": mfu, "skipped": state.skipped}
        if state.trained_tokens is not None:  # fine-tuning: targets scored, of the `tokens` seen
            record["trained_tokens"] = state.trained_tokens
        if muon_lr is not None:
            record["muon_lr"] = muon_lr
        mem = memory_gb()
        if mem is not None:
            record["memory_gb"] = mem
        self.writer.log(record)
        self.last_loss = mean_loss
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                             gn=f"{grad_norm:.2f}" if grad_norm is not None and math.isfinite(grad_norm) else "nan",
                             tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu * 100:.1f}%" if mfu is not None else "-")
        self._loss.zero_()
        self._steps = 0
        self._window_start(state.tokens)

    def restart_clock(self, state) -> None:
        """The current window's rate is measured from here on (after the step that compiled the model); its
        loss keeps the steps already in it."""
        self._window_start(state.tokens)

    def restart_window(self, state) -> None:
        """After a rollback: the bar and the window continue from the restored step."""
        self.bar.n = state.step
        self._loss.zero_()
        self._steps = 0
        self._window_start(state.tokens)

    @contextlib.contextmanager
    def excluded(self):
        """Time spent inside is not training time; yields a dict whose "seconds" is set on exit."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing = {"seconds": 0.0}
        started = time.perf_counter()
        try:
            yield timing
        finally:
            timing["seconds"] = time.perf_counter() - started
            self._excluded += timing["seconds"]

    def record(self, record: dict) -> None:
        """A metrics.jsonl record (and TensorBoard / W&B scalars)."""
        self.writer.log(record)

    def event(self, record: dict) -> None:
        """An events.jsonl record: the run started or resumed (with the metrics.jsonl line it starts at),
        saved, rolled back."""
        if record.get("event") == "start" and self.writer.enabled:
            record = {**record, "metrics_line": self.writer.lines}
        self.writer.event(record)

    def say(self, text: str) -> None:
        if dist.is_main():
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
