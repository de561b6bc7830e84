"""Training progress for people watching the Prefect UI: a Tracker that also moves a progress artifact.

`ProgressTracker` wraps the run's real tracker (MLflow or do-nothing) and, on every step metric the
training loop reports, updates one Prefect progress artifact to step / total steps. It adds nothing to
llmcore, which keeps reporting through its Tracker interface without knowing about Prefect.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from llmcore.tracking import Tracker


class ProgressTracker:
    def __init__(self, inner: Tracker, total_steps: int, key: str, description: str):
        self.inner, self.total = inner, max(1, total_steps)
        self.artifact: UUID = create_progress_artifact(0.0, key=key, description=description)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics(metrics, step)
        if step:
            self.advance(step)

    def advance(self, step: int) -> None:
        """Move the bar to `step` (also for steps a launched process reports only in its log)."""
        update_progress_artifact(self.artifact, min(100.0, 100.0 * step / self.total))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)
