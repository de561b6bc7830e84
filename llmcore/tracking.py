"""Experiment tracking behind a do-nothing default.

Library code reports parameters, metrics and artifacts through `Tracker`; `NullTracker` (the default)
drops them, `MlflowTracker` sends them to one MLflow run by id. This is the only llmcore module that
touches MLflow, and it imports MLflow only when an `MlflowTracker` is built, so llmcore runs without it.
Run creation, nesting and model logging belong to the orchestration layer (`tasks/tracking.py`).

Tracking never fails or slows a training run: `MlflowTracker` queues what it is given and a background
thread sends it, retrying with backoff while the server is unreachable. The queue is bounded; what does
not fit, and what is still unsent when the tracker is closed, goes to a local JSON-lines fallback file
whose path is logged as a warning.
"""

import collections
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from llmcore.distributed import env_rank
from llmcore.environment import environ_copy

log = logging.getLogger("llmcore.tracking")

# Environment variables whose values must never reach a tracking server, whatever carries them.
# MLflow error codes that mean "will never succeed", as opposed to an unreachable or failing server.
_REFUSED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
}
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH", re.IGNORECASE
)


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """Drops everything: the default for library calls, notebooks and the GPU-only box."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


_OPEN: dict[str, list["MlflowTracker"]] = collections.defaultdict(list)
_OPEN_LOCK = threading.Lock()


class MlflowTracker:
    """Logs to an existing MLflow run by id, through the client, so it works from any thread.

    Params skip None values; string values that are paths under `relative_to` are logged relative to
    it; secrets from the environment are masked. Calls return at once: a sender thread delivers them in
    order. `close()` (or `close_trackers(run_id)`) waits for delivery and writes what could not be sent
    to `fallback` (default `mlruns/fallback/<run_id>.jsonl`).
    """

    def __init__(
        self,
        run_id: str,
        *,
        relative_to: Path | None = None,
        fallback: Path | None = None,
        max_pending: int = 100_000,
    ):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self.relative_to = Path(relative_to).resolve() if relative_to is not None else None
        self.fallback = Path(fallback or Path("mlruns") / "fallback" / f"{run_id}.jsonl").absolute()
        self.max_pending = max_pending
        self.undelivered = 0  # operations written to the fallback file
        self.last_error: BaseException | None = None
        self._pending: collections.deque[tuple] = collections.deque()
        self._in_flight: list[tuple] = []
        self._cond = threading.Condition()
        self._closing = False
        self._give_up = threading.Event()
        self._thread = threading.Thread(
            target=self._send_loop, name=f"mlflow-tracker-{run_id[:8]}", daemon=True
        )
        self._thread.start()
        with _OPEN_LOCK:
            _OPEN[run_id].append(self)

    def log_params(self, params: Mapping[str, Any]) -> None:
        secrets = secret_values()
        for key, value in flatten(params).items():
            if value is not None:
                self._put(("param", key, scrub(self._relative(value), secrets)[:6000]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is not None:
                self._put(("metric", key, float(value), now, step or 0))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder; it must stay in place until the tracker is closed."""
        self._put(("artifact", str(Path(path).absolute()), artifact_path))

    def close(self, timeout: float = 30.0) -> int:
        """Deliver what is queued (waiting up to `timeout` seconds while the server is unreachable), write
        the rest to the fallback file, stop the sender; return how many operations went to the file."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._pending or self._in_flight) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            left = list(self._in_flight) + list(self._pending)
            self._pending.clear()
            self._give_up.set()
        self._thread.join(timeout=1.0)
        with _OPEN_LOCK:
            if self in _OPEN.get(self.run_id, []):
                _OPEN[self.run_id].remove(self)
        if left:
            with self._cond:  # a sender still inside a request past the deadline may spill a refused batch
                self._spill(left)
        if self.undelivered:
            log.warning(
                "%d tracking records of run %s could not be sent to MLflow (last error: %s); written to %s",
                self.undelivered,
                self.run_id,
                str(self.last_error).splitlines()[0][:200],
                self.fallback,
            )
        return self.undelivered

    def _relative(self, value: Any) -> str:
        text = str(value)
        if self.relative_to is not None and isinstance(value, (str, Path)) and os.path.isabs(text):
            path = Path(text).resolve()
            if path.is_relative_to(self.relative_to):
                return str(path.relative_to(self.relative_to))
        return text

    def _put(self, op: tuple) -> None:
        # What the sender thread reads is only this queue of tuples of strings and numbers, built in the
        # caller's thread (params flattened, values converted, secrets taken from one copy of the
        # environment), so nothing the caller changes later reaches it; the queue, the in-flight batch,
        # the fallback file and its count are touched under self._cond.
        with self._cond:
            if self._give_up.is_set():
                self._spill([op])
                return
            if len(self._pending) >= self.max_pending:  # bounded memory: overflow goes straight to the file
                self._spill([op])
                return
            self._pending.append(op)
            self._cond.notify_all()

    def _spill(self, ops: list[tuple]) -> None:
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        with open(self.fallback, "a", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"run_id": self.run_id, "kind": op[0], "value": op[1:]}) + "\n" for op in ops
            )
        self.undelivered += len(ops)

    def _take(self) -> list[tuple]:
        """The next batch: consecutive metrics/params (MLflow's batch limits), or one artifact."""
        first = self._pending.popleft()
        batch = [first]
        if first[0] != "artifact":
            limit = 1000 if first[0] == "metric" else 100
            while self._pending and self._pending[0][0] == first[0] and len(batch) < limit:
                batch.append(self._pending.popleft())
        return batch

    def _send(self, batch: list[tuple]) -> None:
        from mlflow.entities import Metric, Param

        kind = batch[0][0]
        if kind == "metric":
            self._log_batch(metrics=[Metric(*op[1:]) for op in batch])
        elif kind == "param":
            self._log_batch(params=[Param(*op[1:]) for op in batch])
        elif Path(batch[0][1]).is_dir():
            self.client.log_artifacts(self.run_id, batch[0][1], batch[0][2])
        else:
            self.client.log_artifact(self.run_id, batch[0][1], batch[0][2])

    def _log_batch(self, metrics: Sequence[Any] = (), params: Sequence[Any] = ()) -> None:
        """One attempt at MLflow's log-batch call. Against a server, it is tried once: the sender retries
        on its own schedule, which close() cuts short, whereas the client's HTTP retries (7, minutes of
        backoff) can hold a request past close()'s deadline after the server has come back."""
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        store = self.client._tracking_client.store  # the server and its credentials
        if not isinstance(store, RestStore):  # a database: no HTTP retries to bypass
            self.client.log_batch(self.run_id, metrics=list(metrics), params=list(params))
            return
        body = LogBatch(
            run_id=self.run_id, metrics=[m.to_proto() for m in metrics], params=[p.to_proto() for p in params]
        )
        endpoint = "/api/2.0/mlflow/runs/log-batch"
        response = http_request(
            store.get_host_creds(),
            endpoint,
            "POST",
            max_retries=0,
            timeout=(5, 60),  # connect, read: a server that does not answer is tried again soon
            json=json.loads(message_to_json(body)),
        )
        verify_rest_response(response, endpoint)

    def _send_each(self, batch: list[tuple]) -> None:
        """Send a refused batch record by record, so that one bad record does not take the others along."""
        for op in batch:
            try:
                self._send([op])
            except Exception as error:  # noqa: BLE001 - filed, never raised
                log.warning("MLflow refused a tracking record of run %s: %s", self.run_id, error)
                with self._cond:
                    self._spill([op])

    def _send_loop(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._pending and not self._give_up.is_set():
                    if self._closing:
                        return
                    self._cond.wait()
                if self._give_up.is_set():
                    return
                self._in_flight = self._take()
            try:
                self._send(self._in_flight)
            except Exception as error:  # noqa: BLE001 - a tracking failure is retried or filed, never raised
                self.last_error = error
                refused = getattr(error, "error_code", None) in _REFUSED
                if refused:  # the server answered no: sending it again would get the same answer
                    self._send_each(self._in_flight)
                with self._cond:
                    if not refused and not self._give_up.is_set():
                        self._pending.extendleft(reversed(self._in_flight))
                    self._in_flight = []
                    self._cond.notify_all()
                if refused:
                    continue
                log.warning(
                    "MLflow unreachable, retrying in %.0f s: %s", delay, str(error).splitlines()[0][:200]
                )
                with self._cond:  # close() cuts the wait short: until its deadline, a retry every second
                    self._cond.wait_for(lambda: self._closing or self._give_up.is_set(), timeout=delay)
                if self._give_up.wait(1.0 if self._closing else 0.0):
                    return
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            with self._cond:
                self._in_flight = []
                self._cond.notify_all()


@contextlib.contextmanager
def env_tracker() -> Iterator[Tracker]:
    """The tracker of a launched training process: on rank 0, an `MlflowTracker` on the run named by
    MLFLOW_RUN_ID (how a launcher such as tasks/distributed.py hands its run to torchrun's processes),
    delivered when the block ends; a `NullTracker` on other ranks and without the variable."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or env_rank() != 0:
        yield NullTracker()
        return
    tracker = MlflowTracker(run_id)
    try:
        yield tracker
    finally:
        tracker.close()


def close_trackers(run_id: str, timeout: float = 30.0) -> int:
    """Close every open tracker of a run (before the run is ended); return the records sent to fallback."""
    with _OPEN_LOCK:
        trackers = list(_OPEN.pop(run_id, []))
    return sum(tracker.close(timeout) for tracker in trackers)


def secret_values() -> list[str]:
    """The values of the secret-looking environment variables (of 6 characters or more), from one copy of
    the environment: other threads (MLflow's telemetry) change it while params are logged."""
    return [v for k, v in environ_copy().items() if len(v) >= 6 and _SECRET_NAME.search(k)]


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with every one of `secrets` (from `secret_values()`) masked."""
    for value in secrets:
        text = text.replace(value, "***")
    return text


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": 4}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
