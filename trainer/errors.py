"""The one exception type for user mistakes.

Library code raises `UserError("what is wrong; how to fix it")`; Click prints it as a single
`Error: ...` line on stderr and exits with status 1, so users never see a traceback for bad input.
"""
import os
from typing import Optional

import click


class UserError(click.ClickException):
    """A problem the user can fix (bad path, bad option, inconsistent data).

    `every_rank=True` marks an error that every rank of a launch meets alike (bad options or data, an op
    build that fails): it is printed once per machine, by local rank 0, instead of once per rank; the others
    exit quietly with the same status. False marks one that may be this rank's alone (its GPU ran out of
    memory): every rank that meets it prints it. None (the default) is undecided: printed by every rank,
    and a run's set-up (trainer/train/loop.py) takes it as every rank's.
    """

    def __init__(self, message: str, every_rank: Optional[bool] = None):
        super().__init__(message)
        self.every_rank = every_rank

    def show(self, file=None) -> None:
        if self.every_rank and os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
            return
        super().show(file)


def describe(error: BaseException, line: int = -1) -> str:
    """`TypeName: one line of the message` (the last by default: a library's traceback-style message ends
    with what went wrong), for wrapping another library's exception into a one-line UserError."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[line].strip() if lines else 'no message'}"
