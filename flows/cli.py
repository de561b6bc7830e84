"""Command lines for flows, derived from their typed parameters: one kebab-case flag per field.

A flow parameter that is a config dataclass contributes one flag per field (`config.vocab_size` ->
`--vocab-size`); a plain parameter is one flag; parameters without a default are required. Configs are
built (and validated) here, before Prefect starts, so bad input fails at once with a one-line error.
"""

import argparse
import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any

from llmcore.cli import add_flag
from llmcore.errors import ConfigError


def add_flow_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    for name, param in inspect.signature(fn).parameters.items():
        if name == "parent_run_id":
            continue
        annotation = param.annotation
        if dataclasses.is_dataclass(annotation):
            for field in dataclasses.fields(annotation):
                required = (param.default is inspect.Parameter.empty and field.default is dataclasses.MISSING
                            and field.default_factory is dataclasses.MISSING)
                add_flag(parser, field.name, field.type, getattr(param.default, field.name, field.default),
                         required=required, dest=f"{name}.{field.name}")
        else:
            add_flag(parser, name, annotation, param.default, required=param.default is inspect.Parameter.empty)


def flow_arguments(fn: Callable, values: dict[str, Any]) -> dict[str, Any]:
    """Parsed flag values -> keyword arguments for `fn`, building each config dataclass (validated)."""
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation
        if dataclasses.is_dataclass(annotation):
            overrides = {f.name: values[f"{name}.{f.name}"] for f in dataclasses.fields(annotation)
                         if values.get(f"{name}.{f.name}") is not None}
            base = param.default if param.default is not inspect.Parameter.empty else None
            kwargs[name] = dataclasses.replace(base, **overrides) if base is not None else annotation(**overrides)
        elif values.get(name) is not None:
            kwargs[name] = values[name]
    return kwargs


def fail(error: ConfigError) -> typing.NoReturn:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def run_stage_cli(flows: dict[str, Callable], argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description="Run one pipeline stage as a Prefect flow.")
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage, stage_flow in flows.items():
        add_flow_arguments(sub.add_parser(stage, help=(stage_flow.fn.__doc__ or "").strip().splitlines()[0]), stage_flow.fn)
    args = vars(parser.parse_args(argv))
    stage_flow = flows[args.pop("stage")]
    try:
        print(stage_flow(**flow_arguments(stage_flow.fn, args)))
    except ConfigError as error:
        fail(error)
