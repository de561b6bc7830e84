"""Command lines for flows, derived from their typed parameters: one kebab-case flag per field.

A flow parameter that is a config dataclass contributes one flag per field (`config.vocab_size` ->
`--vocab-size`); a plain parameter is one flag; parameters without a default are required. Configs are
built (and validated) here, before Prefect starts, so bad input fails at once with a one-line error.

`run_command` runs a flow command so that any failure, wherever it is raised, ends it with one line on
stderr (the problem, the file or URI, the fix) and a non-zero exit: tracebacks from Prefect's engine and
torch go to a log file under `<runs_dir>/logs/` that the line names, and to the terminal with `--debug`.
"""

import argparse
import dataclasses
import errno
import inspect
import logging
import os
import signal
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcore.cli import add_flag
from llmcore.errors import ConfigError
from llmcore.train import TrainingDiverged


def add_flow_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    for name, param in inspect.signature(fn).parameters.items():
        if name == "parent_run_id":
            continue
        annotation = param.annotation
        if dataclasses.is_dataclass(annotation):
            for field in dataclasses.fields(annotation):
                required = (
                    param.default is inspect.Parameter.empty
                    and field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING
                )
                add_flag(
                    parser,
                    field.name,
                    field.type,
                    getattr(param.default, field.name, field.default),
                    required=required,
                    dest=f"{name}.{field.name}",
                )
        else:
            add_flag(
                parser, name, annotation, param.default, required=param.default is inspect.Parameter.empty
            )


def flow_arguments(fn: Callable, values: dict[str, Any]) -> dict[str, Any]:
    """Parsed flag values -> keyword arguments for `fn`, building each config dataclass (validated)."""
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation
        if dataclasses.is_dataclass(annotation):
            overrides = {
                f.name: values[f"{name}.{f.name}"]
                for f in dataclasses.fields(annotation)
                if values.get(f"{name}.{f.name}") is not None
            }
            base = param.default if param.default is not inspect.Parameter.empty else None
            kwargs[name] = (
                dataclasses.replace(base, **overrides) if base is not None else annotation(**overrides)
            )
        elif values.get(name) is not None:
            kwargs[name] = values[name]
    return kwargs


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show Prefect's logs of failures and the full traceback on the terminal",
    )


class _Console(logging.Filter):
    """Keeps failure reports off the terminal (they go to the log file): records carrying a traceback,
    Prefect's error lines and its "Finished in state Failed(<the error>)" notices, and everything once the
    command has failed (the temporary server's shutdown notice would otherwise follow the error line). With
    `debug`, only the last."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug, self.failed = debug, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.failed:
            return False
        if self.debug:
            return True
        prefect_failure = record.name.startswith("prefect") and (
            record.levelno >= logging.ERROR
            or record.getMessage().startswith(("Finished in state Failed", "Finished in state Crashed"))
        )
        return not (record.exc_info or prefect_failure)


class _LazyFileHandler(logging.FileHandler):
    """A log file (and its folder) created at the first record, so a command that fails on its flags
    leaves nothing behind."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _log_to_file(runs_dir: str, debug: bool) -> tuple[Path, _Console]:
    """Send every log record to <runs_dir>/logs/<time>-<pid>.log and filter the terminal handlers Prefect
    installed on the root logger."""
    log_file = Path(runs_dir) / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handler = _LazyFileHandler(log_file, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    console = _Console(debug)
    for stream_handler in root.handlers:
        if stream_handler is not handler and isinstance(stream_handler, logging.StreamHandler):
            stream_handler.addFilter(console)
    return log_file, console


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError)
        and ("can't allocate memory" in str(error) or "out of memory" in str(error))
    )


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from (`raise ... from`), outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__
    return chain


def explain(error: BaseException, log_file: Path, runs_dir: str) -> tuple[str, int]:
    """The one line that reports `error` (problem, file or URI, fix) and the exit status."""
    trace = f"(full trace in {log_file})"
    for cause in _causes(error):
        if isinstance(cause, ConfigError):
            return str(cause), 2
        if isinstance(cause, TrainingDiverged):
            return str(cause), 1
        if isinstance(cause, Terminated):
            return "terminated (SIGTERM): rerun the same command to resume from the last checkpoint", 143
        if isinstance(cause, KeyboardInterrupt):
            return "interrupted: rerun the same command to resume from the last checkpoint", 130
        if _out_of_memory(cause):
            return (
                f"out of memory ({_first_line(cause)}): lower --batch-size or --block-size, or raise "
                f"--grad-accum-steps to keep the tokens per step {trace}"
            ), 1
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"disk full writing {cause.filename or runs_dir}: free space there or pass --runs-dir on "
                f"another disk {trace}"
            ), 1
        if "ephemeral Prefect API server" in str(cause):
            return (
                f"Prefect's temporary server did not start in time: raise "
                f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (a loaded machine) or start "
                f"`prefect server start` and set PREFECT_API_URL {trace}"
            ), 1
        if isinstance(cause, PermissionError):
            return (
                f"permission denied on {cause.filename or runs_dir}: give this user access to it or pass "
                f"another path {trace}"
            ), 1
    return f"{type(error).__name__}: {_first_line(error)} {trace}", 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `kill`), raised like Ctrl-C so that Prefect stops its temporary server."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run_command(body: Callable[[], None], runs_dir: str, debug: bool) -> None:
    """Run a flow command's body; report any failure in one line on stderr and exit non-zero."""
    log_file, console = _log_to_file(runs_dir, debug)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        body()
    except (Exception, KeyboardInterrupt) as error:
        line, status = explain(error, log_file, runs_dir)
        if not isinstance(error, ConfigError):  # a ConfigError's line says all there is to say
            logging.getLogger("flows").error("%s", line, exc_info=error)
        for handler in logging.getLogger().handlers:
            handler.flush()
        console.failed = True
        if debug:
            traceback.print_exception(error)
        print(f"error: {line}", file=sys.stderr, flush=True)
        _stderr_to(log_file if log_file.exists() else Path(os.devnull))
        raise SystemExit(status) from None


def _stderr_to(path: Path) -> None:
    """Send this process's stderr to `path` from here on, so that the error line stays the last one: as
    they stop at exit, Prefect's threads can print a cancelled task's trace (CancelledError)."""
    with open(path, "a", encoding="utf-8") as target:
        os.dup2(target.fileno(), sys.stderr.fileno())


def require_tracking_server(timeout: float = 5.0) -> None:
    """ConfigError within seconds when MLFLOW_TRACKING_URI names an HTTP server that does not answer,
    instead of MLflow's minutes of retries once the flow has started."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (perhaps asking for credentials): the server is up
    except OSError as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"MLflow tracking server {uri} does not answer ({reason}): start it (mlflow server "
            "--host 127.0.0.1 --port PORT) or unset MLFLOW_TRACKING_URI to track in ./mlruns"
        ) from None


def run_stage_cli(flows: dict[str, Callable], argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.stages", description="Run one pipeline stage as a Prefect flow."
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage, stage_flow in flows.items():
        stage_parser = sub.add_parser(stage, help=(stage_flow.fn.__doc__ or "").strip().splitlines()[0])
        add_flow_arguments(stage_parser, stage_flow.fn)
        add_debug_flag(stage_parser)
    args = vars(parser.parse_args(argv))
    stage_flow, debug = flows[args.pop("stage")], args.pop("debug")

    def run() -> None:
        from tasks.tracking import configure_tracking

        kwargs = flow_arguments(stage_flow.fn, args)
        require_tracking_server()
        configure_tracking()  # before any MlflowClient exists, or it tracks to ./mlflow.db
        print(stage_flow(**kwargs))

    run_command(run, args.get("runs_dir") or "runs", debug)
