"""The Prefect task runners that the data stages map their per-part tasks on: `--task-runner local|ray`.

`local` is Prefect's ThreadPoolTaskRunner with a thread per core. Sentencepiece encodes each part on all
cores itself; ingestion's parts hold Python's interpreter lock (decoding, hashing, JSON), so for a large
local source each part runs in a child interpreter of its own (`parts_in_children`). Prefect's
ProcessPoolTaskRunner is not used: it spawns interpreters that import Prefect again, which cost more than
the encoding (the stdlib's 12 MB: 70-78 s against 10-11 s on this project's 2-core machine). `ray` is
prefect-ray's RayTaskRunner, a process per task across a cluster, at `--ray-address` (`ray://host:10001`
or `auto`) or, without one, on a Ray started in this process; every node must see `runs_dir` (shared
storage). Ray is an optional extra (`pip install 'llm-pipeline[ray]'`). How a source is cut into parts is
`llmcore.corpus`'s and `llmcore.tokenizer`'s business, not this module's.
"""

import os
from typing import Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from llmcore.errors import ConfigError

RunnerName = Literal["local", "ray"]
# The `corpus-reading` subflow on 2 cores, threads against a process per part (0.1 s to start each): 1.1 s
# against 2.1 s for 10 MB of text, 2.1 s both for 40 MB, 5.1 s against 4.1 s for 100 MB, 10.1-11.1 s
# against 6.1 s for 239 MB (README, "Corpora larger than memory").
CHILD_PARTS_MIN_BYTES = 64 << 20


def local_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def parts_in_children(name: str, source_bytes: int | None) -> bool:
    """Whether ingestion's parts each run in a child process of their own: on the local runner's threads,
    for a local source of at least CHILD_PARTS_MIN_BYTES (Ray's tasks are processes already)."""
    return name == "local" and (source_bytes or 0) >= CHILD_PARTS_MIN_BYTES


def task_runner_for(name: str, ray_address: str | None = None, ray_init: dict | None = None) -> TaskRunner:
    """The task runner called `name`; `ray_init` are extra `ray.init` arguments (e.g. num_cpus) for a
    Ray started here. ConfigError for an unknown name, a Ray address without Ray, or Ray not installed."""
    if name == "local":
        if ray_address:
            raise ConfigError(f"--ray-address {ray_address} needs the Ray runner: pass --task-runner ray too")
        return ThreadPoolTaskRunner(max_workers=local_cores())
    if name != "ray":
        raise ConfigError(f"unknown task runner {name!r}: pass --task-runner local or --task-runner ray")
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as error:
        raise ConfigError(
            f"--task-runner ray needs prefect-ray and ray ({error}): pip install 'llm-pipeline[ray]'"
        ) from None
    return RayTaskRunner(address=ray_address, init_kwargs=ray_init)
