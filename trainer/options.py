"""Command-line options made from the config dataclasses (trainer/config.py), so that each option's name,
type, default and help live in one place.

Every option defaults to None on the command line: only what the user passed reaches the config, where
the dataclass default applies (and, for a run, a `--config` YAML file sits between the two). The help
text states the dataclass's default, or the field's `shown` text where the default is worked out later.
"""
import dataclasses
import typing

import click

from trainer.config import DEMO_DEFAULTS, TrainConfig


class _IntOrAuto(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not an integer or auto", param, ctx)


def config_options(cls, exclude=()):
    """A decorator adding an option for every field of `cls` that has help (less `exclude`), required fields
    first, then in field order."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("help") and f.name not in exclude]
    fields.sort(key=lambda f: not _required(f))

    def decorate(command):
        for f in reversed(fields):
            command = _option(cls, f)(command)
        return command
    return decorate


def given(options: dict) -> dict:
    """Only the options the user actually passed."""
    return {k: v for k, v in options.items() if v is not None and v != ()}


def json_option(command):
    return click.option("--json", "json_output", is_flag=True, help="Print the result as one JSON line.")(command)


def set_option(command):
    return click.option("--set", "set_", multiple=True, metavar="KEY=VALUE",
                        help="Override a model config field (repeatable).")(command)


def _required(f) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _option(cls, f):
    meta = f.metadata
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    text = meta["help"] + _shown_default(cls, f)
    kind = _base_type(f.type)
    if kind is bool:
        if meta.get("is_flag"):
            return click.option(flag, f.name, is_flag=True, default=None, help=text)
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=text)
    if meta.get("int_or_auto"):
        kind = _IntOrAuto()
    elif "choices" in meta:
        kind = click.Choice(meta["choices"])
    elif "min" in meta:
        kind = click.IntRange(min=meta["min"])
    elif meta.get("path"):
        kind = click.Path()
    return click.option(flag, f.name, type=kind, default=None, required=_required(f), metavar=meta.get("metavar"),
                        help=text)


def _base_type(annotation):
    """int for Optional[int], and so on."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def _shown_default(cls, f) -> str:
    if _required(f):
        return ""
    if "shown" in f.metadata:
        shown = f.metadata["shown"]
    elif f.default is None:
        return ""
    else:
        shown = {True: "on", False: "off"}.get(f.default, f.default) if isinstance(f.default, bool) else f.default
    demo = DEMO_DEFAULTS.get(f.name) if cls is TrainConfig else None
    return f" [default: {shown}" + (f"; the demo: {demo}" if demo not in (None, f.default) else "") + "]"


def trust_option(command):
    """`--trust-checkpoints`, on the commands that read checkpoints (the CLI group, tools/zero_to_fp32.py)."""
    def trust(context, param, value):
        if value:
            from trainer.checkpoint import safe_load

            safe_load.trust()

    return click.option("--trust-checkpoints", is_flag=True, expose_value=False, is_eager=True, callback=trust,
                        help="Load checkpoint files with full pickle, which runs any code they carry: only for files "
                             "from a source you trust. [default: tensors and the types DeepSpeed saves only]")(command)
