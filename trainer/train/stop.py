"""When a run stops early: SIGTERM / Ctrl-C, the --max-time budget, or a --stop-after-steps pause.

All ranks must stop at the same step, so each rank's view (a signal it received, its clock) is
shared with an all-reduce after every step. The --max-time deadline keeps room for the slowest
step and the slowest save seen so far, so the run has saved and stopped when the budget ends.
"""
import signal
import time
from typing import Optional

import torch

from trainer import dist
from trainer.config import parse_duration


class StopPolicy:
    def __init__(self, max_time: Optional[str], stop_after_steps: Optional[int], start_step: int, device):
        self.deadline = time.time() + parse_duration(max_time) if max_time else None
        self.pause_at = start_step + stop_after_steps if stop_after_steps else None
        self.device = device
        self.signal = None
        self.slowest_step = 0.0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def reason(self, step: int, step_seconds: float, save_seconds: float) -> Optional[str]:
        """Why the run should save and stop after `step`, agreed by every rank; None to go on."""
        self.slowest_step = max(self.slowest_step, step_seconds)
        out_of_time = self.deadline is not None and time.time() >= self.deadline - self.slowest_step - save_seconds
        flags = dist.all_reduce_max(torch.tensor([self.signal is not None, out_of_time],
                                                      dtype=torch.float32, device=self.device))
        if flags[0] > 0:
            return f"signal {self.signal or 'on another rank'}"
        if flags[1] > 0:
            return "max-time reached"
        if self.pause_at is not None and step >= self.pause_at:
            return "--stop-after-steps"
        return None
