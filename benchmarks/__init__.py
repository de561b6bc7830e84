"""Side-by-side benchmarks of llmcore against what a user would pick instead: `python -m benchmarks`.

Each comparison runs both sides in one process (or, for whole-program comparisons, one subprocess per
repetition), alternating A and B repetition by repetition so that a noisy, shared machine slows both
alike, and reports the median of each side and their ratio against the goal set in issue 8. A missed goal
is reported with its shortfall; a comparison is never made easier to meet a goal. The results are
printed as a table and logged as a run of the `benchmarks` MLflow experiment (`benchmarks.__main__`).

These are measurements, not tests: nothing here asserts a speed. They need `transformers` (train step
and generation), and Prefect and MLflow (orchestration overhead, logging).
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    """One comparison: our side (A) against the reference (B), as throughputs where higher is better."""

    comparison: str  # what is compared, e.g. "train step vs LlamaForCausalLM"
    unit: str  # of `ours` and `theirs`, e.g. "tokens/s"
    ours: float  # median throughput of our side
    theirs: float  # median throughput of the reference
    goal: float  # the ratio ours / theirs the issue asks for (at least)
    note: str = ""  # what was measured, and why a goal was missed

    @property
    def ratio(self) -> float:
        return self.ours / self.theirs

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal

    def row(self) -> dict[str, object]:
        return {
            "comparison": self.comparison,
            "unit": self.unit,
            "ours": round(self.ours, 2),
            "theirs": round(self.theirs, 2),
            "ratio": round(self.ratio, 3),
            "goal": f">= {self.goal:.3g}x",
            "met": "yes" if self.met else f"no ({self.ratio / self.goal:.0%} of goal)",
            "note": self.note,
        }


def interleaved(
    sides: dict[str, Callable[[], object]],
    repetitions: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per call of each side, calls alternating between sides (ABAB..., the order rotated
    every repetition so neither side always runs right after the other). `sync` waits for a device."""
    for _ in range(warmup):
        for call in sides.values():
            call()
    sync()
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for rep in range(repetitions):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            started = time.perf_counter()
            sides[name]()
            sync()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}
