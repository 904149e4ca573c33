"""One source for every config field: a dataclass per service drives its CLI and the launcher.

A service declares its settings once, as a dataclass whose fields carry their help text (and
unit) in ``metadata`` via :func:`option`. From that one declaration:

* :func:`add_arguments` adds ``--field-name`` flags to an :mod:`argparse` parser (type, default,
  choices and help all come from the field);
* :func:`from_namespace` builds the dataclass back from the parsed arguments (the dataclass's own
  ``__post_init__`` validates and raises ``ValueError``);
* :func:`to_argv` turns an instance into the command-line flags that reproduce it, which is how
  the launcher passes settings through to the processes it starts without restating any flag.

This follows vLLM's ``EngineArgs`` / nano-vllm's ``Config``: the dataclass is the contract, the
CLI is derived. Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` of
strings, and ``X | None`` of those (``None`` = "not set"; such a flag has no ``--no-`` form).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")

_HELP = "tandem.help"
_FLAG = "tandem.flag"
_CLI = "tandem.cli"
_ALIASES = "tandem.aliases"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    cli: bool = True,
    aliases: tuple[str, ...] = (),
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with CLI metadata.

    Args:
        default: the default value (as :func:`dataclasses.field`).
        help: one line for ``--help``; state the unit (s, ms, GiB, tokens, blocks).
        flag: the flag name if not ``--`` + the field name with ``-`` for ``_``.
        cli: False keeps the field out of the command line (set programmatically).
        aliases: more flag names accepted for it (e.g. Dynamo's name for the same knob).
        default_factory: as :func:`dataclasses.field`.
    """
    meta = {_HELP: help, _FLAG: flag, _CLI: cli, _ALIASES: tuple(aliases)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field[Any]) -> str:
    """The ``--flag`` of a field."""
    return f.metadata.get(_FLAG) or "--" + f.name.replace("_", "-")


def cli_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of dataclass ``cls`` that appear on the command line, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get(_CLI, True)]


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``(base type, optional)`` for ``X`` or ``X | None``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union type {tp!r}")
        return args[0], True
    return tp, False


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one flag per CLI field of dataclass ``cls`` to ``parser``.

    ``bool`` fields become ``--flag`` / ``--no-flag``; ``Literal`` fields get ``choices``;
    fields without a default are required. ``defaults`` overrides field defaults (e.g. the
    launcher's own). Raises ``TypeError`` for a field type this module cannot express.
    """
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    overrides = defaults or {}
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        base, _ = _unwrap(hints[f.name])
        name = flag_name(f)
        names = [name, *f.metadata.get(_ALIASES, ())]
        help_text = f.metadata.get(_HELP, "")
        if f.name in overrides:
            default: Any = overrides[f.name]
            required = False
        elif f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if base is bool:
            if default is not None:
                kwargs["help"] = f"{help_text} (default: {'on' if default else 'off'})"
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if get_origin(base) is Literal:
            choices = list(get_args(base))
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif base in (int, float, str):
            kwargs["type"] = base
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported CLI type {hints[f.name]!r}")
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default is not None:
                kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(*names, **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Build dataclass ``cls`` from parsed arguments (fields missing from ``ns`` keep their
    defaults; ``overrides`` win). The dataclass validates itself (``ValueError``)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
    return cls(**values)


def to_argv(obj: Any, *, exclude: Iterable[str] = (), only_changed: bool = True) -> list[str]:
    """Command-line flags that reproduce dataclass instance ``obj`` through :func:`add_arguments`.

    With ``only_changed`` (default) fields equal to their declared default are left out, so the
    receiving process applies its own default. ``None`` values are never written.
    """
    skip = set(exclude)
    argv: list[str] = []
    for f in cli_fields(type(obj)):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if only_changed and f.default is not dataclasses.MISSING and value == f.default:
            continue
        if value is None:
            continue
        name = flag_name(f)
        if isinstance(value, bool):
            argv.append(name if value else "--no-" + name[2:])
        else:
            argv += [name, str(value)]
    return argv
