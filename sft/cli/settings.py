"""Not in the book: command-line flags generated from a settings dataclass (``TrainConfig``).

Each field becomes ``--field-name`` in its group, with the field's help and default; booleans
get ``--flag/--no-flag``; choices come from the field (registries read when the parser is
built); ``int | None`` fields accept ``none``. Flags are left out of the namespace unless given
(``SUPPRESS``), so ``given_settings`` knows exactly what the person asked for: the rest comes
from the config's defaults and the model's preset, and a flag that contradicts
``--chapter-path`` is an error rather than dropped.
"""
import argparse
from dataclasses import MISSING, fields

from ..studio.config import GROUPS, field_type, choices_of


def flag_name(name):
    return "--" + name.replace("_", "-")


def _parse(kind, optional, name):
    def parse(text):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag_name(name)} wants a{'n' if kind is int else ''} "
                                             f"{kind.__name__}, got {text!r}") from None
    parse.__name__ = kind.__name__  # argparse's messages name the type
    return parse


def add_config_arguments(parser, config_cls, *, exclude=(), titles=GROUPS):
    """Add a flag for every field of ``config_cls`` (except ``exclude``), grouped as the fields say."""
    groups = {}
    for f in fields(config_cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True):
            continue
        group = meta.get("group", "settings")
        if group not in groups:
            groups[group] = parser.add_argument_group(titles.get(group, group))
        g = groups[group]
        kind, optional = field_type(f)
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = meta.get("help", "")
        shown = f" (default: {default})" if default is not None and "default:" not in help_text else ""
        if kind is bool:
            g.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text + shown)
            continue
        choices = choices_of(f) if f.name != "model" else None  # model names have aliases ("124M")
        g.add_argument(flag_name(f.name), dest=f.name, type=_parse(kind, optional, f.name), choices=choices,
                       default=argparse.SUPPRESS, metavar=f.name.upper() if choices is None else None,
                       help=help_text + shown)
    return groups


def given_settings(args, config_cls):
    """{field: value} for the fields of ``config_cls`` given on the command line."""
    names = {f.name for f in fields(config_cls)}
    return {k: v for k, v in vars(args).items() if k in names}
