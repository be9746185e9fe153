"""The one exception type for user mistakes.

Library code raises `UserError("what is wrong; how to fix it")`; Click prints it as a single
`Error: ...` line on stderr and exits with status 1, so users never see a traceback for bad input.
"""
import click


class UserError(click.ClickException):
    """A problem the user can fix (bad path, bad option, inconsistent data)."""
