"""Soak: one real pretraining process of a few thousand tiny steps, with a checkpoint every 10 steps, an
evaluation every 20 and every step's metrics logged to a real MLflow store (SQLite, the project's default
backend), watched from outside the whole time. Nothing is faked: the child is `python -m llmcore.train`,
it logs to the run named by MLFLOW_RUN_ID as a launched stage does, and the watcher reads its memory and
file descriptors from /proc (psutil) and the checkpoint folder from the disk.

What it checks (the margins, and the smallest leak each catches, are argued where they are defined):
- memory, file descriptors and threads are flat: the second half of the loop never goes above the first
  half's maximum by more than a small margin. The first half's maximum already holds every recurring event
  (an evaluation, a checkpoint serialized in memory, a batch of metrics in flight), so what the second
  half adds beyond it is growth, and a leak shows in each half in proportion to the steps it ran.
- the disk is bounded by the retention rule (`--keep-checkpoints`): at no sampled moment does the folder
  hold more than the kept checkpoints plus the one being written, and it ends with exactly the newest
  ones.
- MLflow holds every point the loop logged, once: each per-step metric at every step, the evaluations at
  every evaluation step, each loss equal to the one the loop printed for that step.

    pytest -m slow tests/test_soak.py -s    # -s prints the measured figures
"""

import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.tiny_run import build_data, env, pretrain_cmd

pytestmark = pytest.mark.slow

STEPS = 5000
CHECKPOINT_INTERVAL = 10  # 500 checkpoints written, 497 of them pruned
EVAL_INTERVAL = 20
KEEP = 3  # --keep-checkpoints
PER_STEP = ("loss", "lr", "grad_norm", "tokens_per_second")  # what the loop logs at every step (on CPU)
PER_EVAL = ("val_loss", "val_bpb")
SAMPLE_EVERY = 0.1  # seconds; a step takes 10-25 ms here, a checkpoint write a few ms

# Margins for the second half of the loop (newest checkpoint 2510-4990) over the first half's maximum
# (10-2500). The child's end (the final checkpoint, the model file, the tracker's last delivery) is left out.
# Memory: without a leak the second half's maximum was 0.15 to 0.3 MiB above the first's (runs of 3,000 to
# 5,000 steps on the project's 2-core machine, quiet and loaded); allocator and SQLite page-cache growth.
# 1 MiB is three times that, and below what a leak puts in 2,500 steps at 420 bytes a step, 4 KiB a
# checkpoint (one is 1.5 MB: any tensor, state or buffer kept from each is caught), 8 KiB an evaluation or
# 100 bytes a logged metric point (10,000 a half). Checked by injecting leaks into the child: keeping each
# step's metrics dict (~600 bytes) raised the second half by 1.4 MiB, and 1 KiB a step by 3.5 MiB.
RSS_MARGIN = 2**20
# File descriptors: 7 or 8 in the loop; a checkpoint's temporary file and SQLite's journal are open for
# milliseconds and may be caught in one half and missed in the other. A leak of one descriptor per
# checkpoint went from 258 to 507; one per evaluation, or even one per 1,000 steps, goes past 2.
FD_MARGIN = 2
THREAD_MARGIN = 2  # steady at 4 (main, batch prefetch, tracker's sender, MLflow's own); same argument


@dataclass(frozen=True)
class Sample:
    seconds: float
    step: int  # newest checkpoint on disk: where the loop is, to CHECKPOINT_INTERVAL steps
    rss: int
    anon: int  # the anonymous part of rss (heap, tensors), without the mapped libraries
    fds: int
    threads: int
    files: int  # in the checkpoint folder, temporary files included
    bytes: int


def folder_state(folder: Path) -> tuple[int, int, int]:
    """Files, bytes, and the newest checkpoint's step; files renamed or pruned while listed are skipped."""
    files, size, step = 0, 0, 0
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return 0, 0, 0
    for entry in entries:
        try:
            size += entry.stat().st_size
        except FileNotFoundError:
            continue
        files += 1
        if m := re.fullmatch(r"step_(\d+)\.pt", entry.name):
            step = max(step, int(m.group(1)))
    return files, size, step


def anon_rss(pid: int) -> int:
    """The anonymous part of the resident memory (heap, tensors): where a leak grows."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^RssAnon:\s+(\d+) kB", status, re.MULTILINE)
    if found is None:  # an exiting process (a zombie) has no memory left to report
        raise ProcessLookupError(pid)
    return int(found.group(1)) * 1024


def watch(process: subprocess.Popen, checkpoints: Path) -> list[Sample]:
    """Sample the child and its checkpoint folder every SAMPLE_EVERY seconds until it exits."""
    child, started, samples = psutil.Process(process.pid), time.monotonic(), []
    while process.poll() is None:
        try:
            with child.oneshot():
                rss, fds, threads = child.memory_info().rss, child.num_fds(), child.num_threads()
            anon = anon_rss(process.pid)
        except (psutil.Error, FileNotFoundError, ProcessLookupError):
            break  # it exited between poll() and the reads
        files, size, step = folder_state(checkpoints)
        samples.append(Sample(time.monotonic() - started, step, rss, anon, fds, threads, files, size))
        time.sleep(SAMPLE_EVERY)
    return samples


def report(name: str, first: list[Sample], second: list[Sample]) -> str:
    """One figure at the first sample of the loop, and its maximum in each half (MiB for sizes)."""
    unit = 2**20 if name in ("rss", "anon", "bytes") else 1
    first_max, second_max = (max(getattr(s, name) for s in half) / unit for half in (first, second))
    start = first[0]
    return (
        f"{getattr(start, name) / unit:.2f} at step {start.step} of {STEPS}, first half max {first_max:.2f}, "
        f"second half max {second_max:.2f}, last {getattr(second[-1], name) / unit:.2f}"
    )


def printed(log: str, pattern: str) -> dict[int, str]:
    """Step -> the value as the loop printed it (4 decimals) for the log lines matching `pattern`."""
    return {int(step): value for step, value in re.findall(pattern, log)}


def test_a_long_run_stays_flat_bounded_and_fully_logged(tmp_path):
    from mlflow import MlflowClient

    data = build_data(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(tracking_uri=uri)  # the store and experiment made once, before the child starts
    experiment = client.create_experiment("soak", artifact_location=str(tmp_path / "mlruns" / "artifacts"))
    run_id = client.create_run(experiment).info.run_id

    out, log_file = tmp_path / "run", tmp_path / "train.log"
    command = pretrain_cmd(
        data,
        out,
        "--max-steps",
        str(STEPS),
        "--checkpoint-interval",
        str(CHECKPOINT_INTERVAL),
        "--eval-interval",
        str(EVAL_INTERVAL),
        "--keep-checkpoints",
        str(KEEP),
    )
    child_env = env() | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id}
    started = time.monotonic()
    # the log goes to a file, not a pipe nobody reads while it runs; the working folder is tmp_path, so
    # that a tracking fallback file would land in tmp_path/mlruns/fallback, where it is looked for below
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, env=child_env, cwd=tmp_path, stdout=log, stderr=log)
        timer = threading.Timer(600, process.kill)  # a hung child fails the test instead of the CI job
        timer.start()
        try:
            samples = watch(process, out / "checkpoints")
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
    wall = time.monotonic() - started
    text = log_file.read_text()
    assert returncode == 0, text[-3000:]
    client.set_terminated(run_id)

    # --- memory, descriptors, threads: the second half of the loop no higher than the first ---
    first = [s for s in samples if CHECKPOINT_INTERVAL <= s.step <= STEPS // 2]
    second = [s for s in samples if STEPS // 2 < s.step < STEPS]
    assert len(first) >= 20 and len(second) >= 20, (len(first), len(second), wall)  # watched throughout
    print(f"\nsoak: {STEPS} steps in {wall:.0f} s, {len(samples)} samples")
    for name in ("rss", "anon", "fds", "threads", "files", "bytes"):
        print(f"  {name}: {report(name, first, second)}")
    margins = {"rss": RSS_MARGIN, "anon": RSS_MARGIN, "fds": FD_MARGIN, "threads": THREAD_MARGIN}
    for name, margin in margins.items():
        first_max, second_max = (max(getattr(s, name) for s in half) for half in (first, second))
        assert second_max <= first_max + margin, f"{name} grew: {first_max} -> {second_max} (margin {margin})"

    # --- disk: the retention rule held at every sampled moment, and at the end ---
    kept = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in kept] == [
        f"step_{step:06d}{suffix}"
        for step in range(STEPS - (KEEP - 1) * CHECKPOINT_INTERVAL, STEPS + 1, CHECKPOINT_INTERVAL)
        for suffix in (".json", ".pt")
    ]
    one = max(p.stat().st_size for p in kept if p.suffix == ".pt") + max(
        p.stat().st_size for p in kept if p.suffix == ".json"
    )
    # while a checkpoint is written the kept ones are still there: KEEP + 1 checkpoints of two files at most
    worst = max(samples, key=lambda s: s.bytes)
    assert max(s.files for s in samples) <= 2 * (KEEP + 1), max(samples, key=lambda s: s.files)
    assert worst.bytes <= (KEEP + 1) * (one + 1024), (worst, one)  # JSON sizes vary by a few bytes
    mib = 2**20
    print(
        f"  checkpoint folder: {one / mib:.2f} MiB a checkpoint, at most {max(s.files for s in samples)} "
        f"files and {worst.bytes / mib:.2f} MiB; at the end {len(kept)} files, "
        f"{sum(p.stat().st_size for p in kept) / mib:.2f} MiB"
    )

    # --- MLflow: every point the loop logged, once, as it printed it ---
    evals = [*range(EVAL_INTERVAL, STEPS + 1, EVAL_INTERVAL)]
    expected = {f"pretrain/{k}": [*range(1, STEPS + 1)] for k in PER_STEP}
    expected |= {f"pretrain/{k}": evals for k in PER_EVAL} | {"pretrain/num_params": [0]}
    assert set(client.get_run(run_id).data.metrics) == set(expected)
    histories = {key: client.get_metric_history(run_id, key) for key in expected}
    for key, steps in expected.items():
        assert sorted(m.step for m in histories[key]) == steps, key  # no step missing, none twice
    losses = printed(text, r"pretrain step (\d+)/\d+ \| loss (\d+\.\d{4})")
    val_losses = printed(text, r"pretrain step (\d+)/\d+ \| val loss (\d+\.\d{4})")
    assert len(losses) == STEPS and len(val_losses) == len(evals)
    assert {m.step: f"{m.value:.4f}" for m in histories["pretrain/loss"]} == losses
    assert {m.step: f"{m.value:.4f}" for m in histories["pretrain/val_loss"]} == val_losses
    assert not (tmp_path / "mlruns" / "fallback").exists()  # nothing spilled to the fallback file
    assert "could not be sent to MLflow" not in text and "MLflow unreachable" not in text
    found, logged = sum(map(len, histories.values())), sum(map(len, expected.values()))
    print(f"  MLflow: {found} points found of {logged} logged; wall time {wall:.0f} s")
