"""The one exception type for user mistakes.

Library code raises `UserError("what is wrong; how to fix it")`; Click prints it as a single
`Error: ...` line on stderr and exits with status 1, so users never see a traceback for bad input.
"""
import click


class UserError(click.ClickException):
    """A problem the user can fix (bad path, bad option, inconsistent data)."""


def describe(error: BaseException, line: int = -1) -> str:
    """`TypeName: one line of the message` (the last by default: a library's traceback-style message ends
    with what went wrong), for wrapping another library's exception into a one-line UserError."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[line].strip() if lines else 'no message'}"
