"""Training on several processes or machines from the pipeline: torchrun as a subprocess.

Prefect has no torchrun integration, so the training tasks start `torchrun ... -m llmcore.train` (or
`llmcore.finetune`) themselves through `launch`: every output line goes to the task's log (training
progress also moves the task's progress bar), rank 0 gets the stage's MLflow run through MLFLOW_RUN_ID
and MLFLOW_TRACKING_URI (`llmcore.tracking.env_tracker` attaches to it), and a non-zero exit fails the
task with the launched command's last error line. The training folder, its checkpoints and manifest are
written by llmcore exactly as in-process, so resume and reuse work the same. With `nnodes` > 1 this
starts this machine's processes only: the same command (logged first) must run on every other node, and
the output folder must be shared.

This module does not choose output folders or log results; tasks/stages.py does.
"""

import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcore.adapters import AdapterConfig
from llmcore.artifacts import MANIFEST, read_json
from llmcore.cli import to_flags
from llmcore.distributed import LaunchConfig, torchrun_command
from llmcore.environment import environ_copy
from llmcore.errors import ConfigError
from llmcore.model import GPTConfig
from llmcore.train import TrainConfig

# An error line of a rank (argparse's `prog: error: ...`, an exception's last traceback line), without
# torchrun's `[rankN]:` prefix; torchrun's own ChildFailedError summary says nothing more.
_ERROR = re.compile(
    r"^(?:\[rank\d+\]:\s*)?(?P<line>(?:\S+: error: "
    r"|(?!torch\.distributed\.elastic)[\w.]+(?:Error|Exception|Diverged): ).*)$"
)
_STEP = re.compile(r" step (\d+)/\d+ \|")


def error_line(line: str) -> str | None:
    """The error a rank reports in this output line, if it is one."""
    found = _ERROR.match(line)
    return found["line"] if found else None


class TorchrunFailed(RuntimeError):
    """torchrun exited non-zero; the message carries the last error line a rank printed."""


def launch(
    config: LaunchConfig,
    module: str,
    args: list[str],
    run_id: str | None,
    logger: logging.Logger | logging.LoggerAdapter,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Run `python -m module args` under torchrun, streaming its output to `logger`; `on_step(step)` is
    called for each training progress line. Raises ConfigError when a rank refused its input (exit 2 with
    an argparse error line), TorchrunFailed on any other failure."""
    command = torchrun_command(config, module, args, sys.executable)
    env = environ_copy(PYTHONUNBUFFERED="1")
    if run_id:
        import mlflow

        env |= {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    logger.info("torchrun: %d process(es) on this node: %s", config.nproc_per_node, shlex.join(command))
    last_error = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as process:
        try:
            for line in process.stdout:
                line = line.rstrip()
                logger.info("%s", line)
                last_error = error_line(line) or last_error
                if on_step and (step := _STEP.search(line)):
                    on_step(int(step[1]))
        except BaseException:  # cancelled, timed out, Ctrl-C: stop the ranks rather than wait for them
            process.terminate()  # torchrun passes SIGTERM on to its ranks
            raise
    if process.returncode == 0:
        return
    if last_error and ": error: " in last_error:  # argparse's line: llmcore's ConfigError, one line
        raise ConfigError(last_error.split(": error: ", 1)[1])
    raise TorchrunFailed(
        f"torchrun running {module} on {config.world_size} process(es) exited with {process.returncode}: "
        f"{last_error or 'no error line (see the log above)'}"
    )


def pretrain(
    config: LaunchConfig,
    tokenizer_dir: str,
    tokens_dir: str,
    model: GPTConfig,
    train: TrainConfig,
    out: Path,
    run_id: str | None,
    logger: logging.Logger | logging.LoggerAdapter,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`llmcore.train.pretrain` under torchrun; returns the manifest rank 0 wrote."""
    args = ["--tokenizer", tokenizer_dir, "--tokens", tokens_dir, "--out", str(out)]
    launch(
        config,
        "llmcore.train",
        args + to_flags(model, skip=("vocab_size",)) + to_flags(train),
        run_id,
        logger,
        on_step,
    )
    return read_json(Path(out) / MANIFEST)


def finetune(
    config: LaunchConfig,
    base_model: str,
    tokenizer_dir: str,
    sft_dir: str,
    train: TrainConfig,
    out: Path,
    max_length: int | None,
    run_id: str | None,
    logger: logging.Logger | logging.LoggerAdapter,
    on_step: Callable[[int], None] | None = None,
    adapter: AdapterConfig = AdapterConfig(),
) -> dict[str, Any]:
    """`llmcore.finetune.finetune` under torchrun (all weights or LoRA); returns the manifest rank 0 wrote."""
    args = ["--base", base_model, "--tokenizer", tokenizer_dir, "--sft", sft_dir, "--out", str(out)]
    args += ["--max-length", str(max_length)] if max_length is not None else []
    launch(config, "llmcore.finetune", args + to_flags(train) + to_flags(adapter), run_id, logger, on_step)
    return read_json(Path(out) / MANIFEST)
