"""Command-line flags derived from typed fields: one optional `--kebab-case` flag per field.

Used by the llmcore module entry points and by the flow command lines, so a config field has the same
flag everywhere. A flag left out parses as None, meaning "keep the config's default".
"""

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; other annotations unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def add_flag(
    parser: argparse.ArgumentParser,
    name: str,
    annotation: Any,
    default: Any = None,
    required: bool = False,
    help: str | None = None,
    dest: str | None = None,
) -> None:
    kind = _base_type(annotation)
    flag = "--" + name.replace("_", "-")
    text = (help + " " if help else "") + ("(required)" if required else f"(default: {default})")
    if kind is bool:
        parser.add_argument(
            flag, dest=dest or name, action=argparse.BooleanOptionalAction, default=None, help=text
        )
    else:
        parser.add_argument(
            flag,
            dest=dest or name,
            type=kind if kind in (int, float, str) else str,
            default=None,
            required=required,
            help=text,
        )


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """One optional flag per field of a config dataclass."""
    for field in dataclasses.fields(config_class):
        if field.name not in skip:
            default = None if field.default is dataclasses.MISSING else field.default
            add_flag(parser, field.name, field.type, default)


def to_flags(config: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that rebuild `config` through `add_config_flags` (None fields left out)."""
    flags: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        name = field.name.replace("_", "-")
        if field.name in skip or value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]  # str of a float round-trips exactly
    return flags


def given(config_class: type, args: dict[str, Any]) -> dict[str, Any]:
    """The parsed flag values of a config dataclass's fields that the user gave (left-out flags are None)."""
    return {k: v for k, v in args.items() if k in config_class.__dataclass_fields__ and v is not None}
