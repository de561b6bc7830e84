"""Every failure is one clear line: bad input caught before Prefect starts, errors raised inside a flow
reported without tracebacks (kept in a log file, shown with --debug), a memory estimate that holds against
measured peaks, and retries only for transient I/O.

The command-line tests run `python -m flows.pipeline` / `python -m flows.stages` in a subprocess from a
temporary folder; the ones that fail before Prefect starts take a few seconds (imports), each one inside a
flow ~10 s more (Prefect's temporary server).
"""

import errno
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flows.cli import explain
from flows.pipeline import PipelineParams
from llmcore.corpus import CorpusConfig, ingest
from llmcore.environment import environ_copy
from llmcore.errors import ConfigError
from llmcore.memory import require_fits, training_bytes
from llmcore.model import GPT, GPTConfig
from llmcore.tokenizer import TokenizerConfig, encode_corpus, train_tokenizer
from llmcore.train import TrainConfig, fit

ROOT = Path(__file__).parents[1]
TINY_MODEL = ["--block-size", "32", "--n-layer", "1", "--n-embd", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the subprocesses of this module: its database is migrated once."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """40 files of real Python source, ~300 KB."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = Path(sys.modules["argparse"].__file__).read_text().splitlines()
    for i in range(40):
        (folder / f"f{i}.py").write_text("\n".join(lines[i * 50 : i * 50 + 200]))
    return folder


def command(
    module: str, *args: str, cwd: Path, prefect_home: Path, **env: str
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in environ_copy().items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    # a fresh Prefect home migrates its database on the first start: slow on a loaded machine
    environ.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def one_line_failure(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """The error line, after checking: non-zero exit, no traceback anywhere, the last line is the error."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), output[-3000:]
    for fragment in fragments:
        assert fragment in line, line
    return line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cli
@pytest.mark.parametrize(
    "case",
    [
        "batch",
        "vocab_small",
        "vocab_large",
        "device",
        "mlflow_down",
        "missing_corpus",
        "classify_column",
        "classify_single_example",
        "lora_target",
    ],
)
def test_bad_input_fails_in_one_line_before_prefect_starts(case, tmp_path, small_corpus, prefect_home):
    port = _closed_port()
    labelled = tmp_path / "tickets.csv"  # label "refund" has a single example
    labelled.write_text(
        "body,intent\n" + "".join(f"ticket {i},{'ab'[i % 2]}\n" for i in range(20)) + "x,refund\n"
    )
    args, env, fragments = {
        "batch": (["--batch-size", "100000"], {}, ["--batch-size", "free"]),
        "vocab_small": (["--vocab-size", "100"], {}, ["--vocab-size >= 261"]),
        "vocab_large": (
            ["--corpus", str(small_corpus), "--vocab-size", "1000000"],
            {},
            [str(small_corpus), "--vocab-size <="],
        ),
        "device": (["--device", "tpu"], {}, ["'tpu'", "--device"]),
        "mlflow_down": (
            ["--corpus", str(small_corpus)],
            {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
            [f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_URI"],
        ),
        "missing_corpus": (["--corpus", "nowhere/"], {}, ["nowhere/", "--corpus"]),
        "classify_column": (
            ["--classify-data", str(labelled), "--label-column", "intent"],
            {},
            [str(labelled), "'text'", "body, intent", "--classify-text-column"],
        ),
        "classify_single_example": (
            ["--classify-data", str(labelled), "--classify-text-column", "body", "--label-column", "intent"],
            {},
            [str(labelled), "'refund' has 1 example"],
        ),
        "lora_target": (
            ["--finetune-method", "lora", "--lora-targets", "c_attn,q_proj"],
            {},
            ["'q_proj'", "--lora-targets", "c_attn"],
        ),
    }[case]
    done = command("flows.pipeline", *args, cwd=tmp_path, prefect_home=prefect_home, **env)
    one_line_failure(done, *fragments)
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
    assert done.returncode == 2
    # Prefect never started, nothing was trained or tracked, no log file left behind
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.flow
def test_diverged_pretraining_is_one_line_naming_real_flags_with_the_trace_in_a_log(
    tmp_path, small_corpus, prefect_home
):
    done = command(
        "flows.pipeline",
        "--corpus",
        str(small_corpus),
        "--vocab-size",
        "400",
        *TINY_MODEL,
        "--max-steps",
        "5",
        "--learning-rate",
        "1e6",
        "--device",
        "cpu",
        cwd=tmp_path,
        prefect_home=prefect_home,
    )
    line = one_line_failure(done, "became non-finite at step", "last good checkpoint")
    assert done.returncode == 1
    flags = set(re.findall(r"--[a-z][a-z-]+", line))
    assert flags and flags <= {"--" + name.replace("_", "-") for name in PipelineParams.model_fields}, line
    logs = list((tmp_path / "runs" / "logs").glob("*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()


@pytest.fixture(scope="module")
def token_folders(tmp_path_factory, small_corpus) -> tuple[Path, Path]:
    """A finished tokenizer and token shards for the small corpus, built by llmcore (no Prefect)."""
    root = tmp_path_factory.mktemp("data")
    ingest(CorpusConfig(source=str(small_corpus)), root / "corpus")
    train_tokenizer(root / "corpus", root / "tok", TokenizerConfig(vocab_size=400))
    encode_corpus(root / "corpus", root / "tok", root / "tokens")
    return root / "tok", root / "tokens"


@pytest.mark.flow
def test_debug_prints_the_trace_and_still_ends_with_the_line(tmp_path, token_folders, prefect_home):
    tok, tokens = token_folders
    done = command(
        "flows.stages",
        "pretrain",
        "--tokenizer-dir",
        str(tok),
        "--tokens-dir",
        str(tokens),
        "--vocab-size",
        "400",
        *TINY_MODEL,
        "--max-steps",
        "3",
        "--learning-rate",
        "1e6",
        "--device",
        "cpu",
        "--debug",
        cwd=tmp_path,
        prefect_home=prefect_home,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "TrainingDiverged" in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: pretrain: loss or gradient norm became non-finite")
    )


@pytest.mark.flow
def test_sigterm_during_training_is_one_line_and_leaves_no_server(tmp_path, token_folders, prefect_home):
    import signal
    import threading
    import time

    tok, tokens = token_folders
    environ = {k: v for k, v in environ_copy().items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    environ.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
    )
    args = [
        "--tokenizer-dir",
        str(tok),
        "--tokens-dir",
        str(tokens),
        "--vocab-size",
        "400",
        *TINY_MODEL,
        "--max-steps",
        "1000000",
        "--device",
        "cpu",
    ]
    child = subprocess.Popen(
        [sys.executable, "-m", "flows.stages", "pretrain", *args],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(300, os.killpg, (child.pid, signal.SIGKILL))  # never hang the suite
    watchdog.start()
    try:
        lines = []
        for line in child.stderr:  # wait until training has started, then stop it as a service manager would
            lines.append(line)
            if "pretrain step" in line:
                break
        else:
            pytest.fail("".join(lines[-30:]))
        child.send_signal(signal.SIGTERM)  # the main process only, not its group
        status = child.wait(timeout=120)
        for _ in range(100):  # the temporary Prefect server goes down with it
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                left_running = False
                break
            time.sleep(0.2)
        else:
            left_running = True
            os.killpg(child.pid, signal.SIGKILL)  # before reading: a survivor would hold stderr open
        rest = child.stderr.read()
        assert status == 143 and not left_running, rest[-3000:]
        assert "Traceback" not in rest and rest.strip().splitlines()[-1].startswith("error: terminated"), rest
    finally:
        watchdog.cancel()
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_known_failures_map_to_lines_that_name_the_fix(tmp_path):
    log = tmp_path / "x.log"
    try:
        torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator's refusal
    except RuntimeError as error:
        line, status = explain(error, log, "runs")
    assert "out of memory" in line and "--batch-size" in line and str(log) in line and status == 1
    with open("/dev/full", "wb", buffering=0) as device, pytest.raises(OSError) as full:
        device.write(b"x")  # a real ENOSPC
    line, _ = explain(full.value, log, "runs/here")
    assert line.startswith("disk full writing runs/here") and "--runs-dir" in line
    line, _ = explain(PermissionError(errno.EACCES, "Permission denied", "/data/a.txt"), log, "runs")
    assert "/data/a.txt" in line and "permission" in line
    assert explain(KeyboardInterrupt(), log, "runs")[1] == 130
    assert explain(ConfigError("bad thing: pass --x"), log, "runs") == ("bad thing: pass --x", 2)
    try:
        try:
            raise MemoryError
        except MemoryError as cause:
            raise RuntimeError("stage failed") from cause
    except RuntimeError as error:
        assert "out of memory" in explain(error, log, "runs")[0]
    line, status = explain(ValueError("first line\nsecond line"), log, "runs")
    assert line == f"ValueError: first line (full trace in {log})" and status == 1


MEASURE = """
import ctypes, json, re, sys, torch
from llmcore.memory import training_bytes
from llmcore.model import GPT, GPTConfig
V, T, L, C, B = map(int, sys.argv[1:])
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for line in open("/proc/self/maps"):  # map every page of the loaded libraries now (MADV_POPULATE_READ)
    fields = line.split()
    if len(fields) == 6 and fields[5].startswith("/") and "r" in fields[1]:
        start, end = (int(a, 16) for a in fields[0].split("-"))
        libc.madvise(start, end - start, 22)
x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
def status():
    text = open("/proc/self/status").read()
    kib = lambda key: int(re.search(key + r":\\s+(\\d+) kB", text).group(1))
    return {key: 1024 * kib(key) for key in ("VmHWM", "VmRSS", "RssFile")}
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) counts from here, not from the imports
base = status()
config = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=C)
model = GPT(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(2):
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
after = status()
estimate = training_bytes(config, B, T, torch.device("cpu")).total
code = after["RssFile"] - base["RssFile"]  # library pages mapped after all (a library loaded on first use)
print(json.dumps({"measured": after["VmHWM"] - base["VmRSS"] - code, "estimate": estimate, "code": code}))
"""


@pytest.mark.parametrize("config", [(2048, 128, 2, 128, 16), (1024, 96, 3, 96, 24)])  # smoke preset; another
def test_memory_estimate_bounds_the_measured_peak_of_real_training_steps(config):
    """The peak of the memory two real training steps allocate is at most the estimate, and not far below.
    The code of torch's libraries is mapped before the steps: the pages its first kernels fault in are
    clean file pages (reclaimable, shared), not memory a batch needs, and their number depends on the
    page cache and the file system (here 18-28 MB of the smoke shape's 270 MB peak, counted before)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=environ_copy(PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert figures["measured"] <= figures["estimate"] <= 1.6 * figures["measured"], figures


def test_training_refuses_a_batch_that_cannot_fit_before_allocating_it(tmp_path):
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=1, n_head=2, n_embd=32))
    free = training_bytes(model.config, 1, 64, torch.device("cpu"))  # bytes per sequence, roughly
    batch = 10 * int(1e12 // (free.activations + free.logits))  # ~10 TB of activations
    with pytest.raises(ConfigError, match="--batch-size"):
        fit(
            model,
            train_batches=None,
            val_batches=[],
            config=TrainConfig(batch_size=batch, device="cpu"),
            checkpoint_dir=tmp_path / "checkpoints",
        )
    assert not (tmp_path / "checkpoints").exists()
    require_fits(model.config, 16, 64, torch.device("cpu"))  # a small batch passes


def _attempts(state) -> int:
    """How many times a finished task run ran, as the server has it. A task run outside a flow reaches the
    server through events, a moment after the call returns: wait up to 20 s for its final state."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for _ in range(200):
            try:
                run = client.read_task_run(state.state_details.task_run_id)
                if run.state is not None and run.state.is_final():
                    return run.run_count
            except ObjectNotFound:
                pass
            time.sleep(0.1)
    raise AssertionError(f"task run {state.state_details.task_run_id} never reached the server")


@pytest.mark.flow
def test_a_transient_read_error_is_retried_with_no_duplicated_output(
    tmp_path, small_corpus, prefect_harness, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.stages import reading_flow
    from llmcore import corpus

    flaky, failures = small_corpus / "f7.py", []
    read_bytes = corpus.read_bytes

    def fails_once(path: Path) -> bytes:  # the fault injected: one EIO on one file, then it reads fine
        if path == flaky and not failures:
            failures.append(path)
            raise OSError(errno.EIO, "Input/output error", str(path))
        return read_bytes(path)

    monkeypatch.setattr(corpus, "read_bytes", fails_once)
    config = CorpusConfig(source=str(small_corpus))
    state = reading_flow(config, "transient-test", str(tmp_path / "runs"), return_state=True)
    assert state.is_completed() and failures == [flaky]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    attempts = sorted(run.run_count for run in runs if run.name.startswith("ingest-part"))
    assert len(attempts) > 2 and attempts[-2:] == [1, 2]  # the scan of the flaky file's part, once more
    folder = Path(state.result())
    sources = [
        json.loads(line)["source"]
        for split in ("train", "validation")
        for line in (folder / f"{split}.jsonl").read_text().splitlines()
    ]
    assert sorted(sources) == sorted(p.name for p in small_corpus.iterdir())  # each file once
    assert [p.name for p in (tmp_path / "runs" / "corpus").iterdir()] == [
        folder.name
    ]  # no half-written leftovers


@pytest.mark.flow
def test_a_vocabulary_sentencepiece_refuses_is_attempted_once(tmp_path, prefect_harness):
    from tasks import stages

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(20):  # 22 KB of four words: more bytes than the vocabulary, too few distinct pieces
        (texts / f"{i}.txt").write_text(
            " ".join(["alpha", "beta", "gamma", "delta"][(i * j) % 4] for j in range(300))
        )
    ingest(CorpusConfig(source=str(texts), validation_fraction=0.3), tmp_path / "corpus")
    state = stages.train_tokenizer(
        str(tmp_path / "corpus"), TokenizerConfig(vocab_size=2000), str(tmp_path / "runs"), return_state=True
    )
    assert state.is_failed() and _attempts(state) == 1
    with pytest.raises(ConfigError, match="--vocab-size <="):
        state.result()


@pytest.mark.flow
def test_deterministic_errors_are_not_retried(prefect_harness):
    import sentencepiece as spm
    from prefect import task

    from tasks.stages import DATA_TASK

    @task(**{**DATA_TASK, "persist_result": False})
    def refuse() -> None:  # sentencepiece's own RuntimeError "Vocabulary size too high", untranslated
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["abc def"] * 10), model_writer=io.BytesIO(), vocab_size=300, minloglevel=2
        )

    @task(**{**DATA_TASK, "persist_result": False})
    def allocate() -> None:
        torch.empty(2**50, dtype=torch.uint8)

    for failing in (refuse, allocate):
        state = failing(return_state=True)
        assert state.is_failed() and _attempts(state) == 1
