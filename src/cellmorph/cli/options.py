"""Command-line options generated from the settings records' fields.

A setting is written once, in its pydantic record (``CVConfig``, ``PrepareConfig``, ``PredictConfig``,
``EmbedConfig``): its name, type, default and description. The options of a command are made from those
fields here, so a new setting reaches the command line without a second definition, and its choices
(a ``Literal``), on/off flags (a ``bool``) and help cannot drift from the record's.

Every generated option defaults to ``None``, "not given": the record's default (or a layout's, for the
settings that depend on it) applies, and a YAML config given with ``--config`` is overridden only by the
options the user typed. The record's own default is shown in ``--help``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# Settings whose flag is not their name with dashes (field name → option name), and flags whose "off"
# spelling is not --no-NAME. The library's errors name the setting (cellmorph.errors.option); the command
# line shows its flag.
OPTION_NAMES = {"num_threads": "threads", "allow_network": "online", "include_controls_as_class": "include_controls"}
NEGATIONS = {"online": "offline"}
OPTION_FLAGS = {setting: "--" + name.replace("_", "-") for setting, name in OPTION_NAMES.items()}

_SCALARS = (bool, int, float, str, Path)


@dataclass(frozen=True)
class OptionGroup:
    """The options generated from one settings record.

    ``options``: parameter name → (annotation, ``typer.Option``), as :func:`cellmorph.cli.common.shared_options`
    takes them; ``fields``: parameter name → the setting's path in the record (a nested record's field is
    ``("augment", "jitter")``); ``parsers``: parameter name → the function that turns the option's text into
    the setting's value (for settings whose type the command line cannot spell, such as a list)."""

    options: dict[str, tuple[Any, Any]]
    fields: dict[str, tuple[str, ...]]
    parsers: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    def settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """The record's keyword arguments for the options that were given (``None``: not given); the fields of a
        nested record as a dict under its name."""
        settings: dict[str, Any] = {}
        for name, value in values.items():
            if value is None or name not in self.fields:
                continue
            *parents, leaf = self.fields[name]
            target = settings
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = self.parsers[name](value) if name in self.parsers else value
        return settings


def _option_type(annotation):
    """The annotation of a setting's option: the setting's own where the command line can spell it (a scalar, a
    ``Literal``, a nested record to flatten), with ``Optional`` dropped; ``None`` where it needs a parser."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        alternatives = [a for a in get_args(annotation) if a is not type(None)]
        return _option_type(alternatives[0]) if len(alternatives) == 1 else None
    if annotation in _SCALARS or origin is Literal:
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _shown_default(info) -> str | bool:
    """The record's default as ``--help`` shows it (nothing where it is None or made per call)."""
    default = info.default
    if default is PydanticUndefined or default is None:
        return False
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return f"{default:.4g}" if isinstance(default, float) else str(default)


def config_options(
    config: type[BaseModel],
    *,
    only: list[str] | tuple[str, ...] | None = None,
    exclude: tuple[str, ...] | set[str] = (),
    names: dict[str, str] | None = None,
    types_: dict[str, Any] | None = None,
    parsers: dict[str, Callable[[Any], Any]] | None = None,
    notes: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
) -> OptionGroup:
    """The typer options of ``config``'s fields (``only`` these, in that order, or all but ``exclude``).

    ``names``: field → option name where it is not the field's (beside :data:`OPTION_NAMES`); ``types_``: field
    → the option's type where the setting's cannot be typed (a list, a union: give a parser too); ``parsers``:
    field → text to value; ``notes``: field → text added to the help, such as per-layout defaults (the record's
    own default is then not shown, since it is not the one that applies everywhere). A field holding a nested
    record gets an option per field of that record, ``--NAME-FIELD`` (its ``enabled`` field: ``--NAME/--no-NAME``).
    """
    names = OPTION_NAMES | (names or {})
    types_, parsers, notes = types_ or {}, parsers or {}, notes or {}
    selected = list(only) if only is not None else [n for n in config.model_fields if n not in exclude]
    options: dict[str, tuple[Any, Any]] = {}
    fields: dict[str, tuple[str, ...]] = {}
    group_parsers: dict[str, Callable[[Any], Any]] = {}
    for name in selected:
        info = config.model_fields[name]
        parameter = "_".join((*prefix, names.get(name, name)))
        if prefix and name == "enabled":
            parameter = "_".join(prefix)
        kind = types_.get(name) or _option_type(info.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            nested = config_options(kind, prefix=(*prefix, names.get(name, name)))
            options |= nested.options
            fields |= {p: (name, *path) for p, path in nested.fields.items()}
            group_parsers |= nested.parsers
            continue
        if kind is None:
            raise TypeError(f"{config.__name__}.{name}: give the command line's type and a parser for {info.annotation}")
        dashed = parameter.replace("_", "-")
        flags = (f"--{dashed}/--{NEGATIONS.get(parameter, 'no-' + dashed)}",) if kind is bool else ()
        help_text = info.description or ""
        if name in notes:
            help_text = f"{help_text} ({notes[name]})" if help_text else notes[name]
        options[parameter] = (Optional[kind], typer.Option(
            None, *flags, help=help_text, show_default=False if name in notes else _shown_default(info)))
        fields[parameter] = (name,)
        if name in parsers:
            group_parsers[parameter] = parsers[name]
    return OptionGroup(options, fields, group_parsers)
