"""Loading an artifact never runs code from it, tampering is caught before use, files get the user's umask,
and one training folder is owned by one process at a time.

The attacks are real: a pickle whose `__reduce__` calls `os.system` to create a marker file, planted as a
model, as a checkpoint and inside a logged MLflow model; a tokenizer.model with one piece reversed (same
length, still a valid model); flipped bytes in token shards and checkpoints.
"""

import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from llmcore.artifacts import MANIFEST, atomic_write_json, file_digest
from llmcore.checkpoint import load_model, save_checkpoint
from llmcore.errors import ConfigError
from llmcore.shards import open_split
from llmcore.tokenizer import MODEL_FILE, Tokenizer
from tests.tiny_run import ROOT, assert_same_weights, build_data, env, pretrain_cmd, run

STEPS = ["--max-steps", "6", "--checkpoint-interval", "3"]


class Evil:
    """Unpickling this calls os.system: what a crafted model file does to `torch.load(weights_only=False)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_evil(path: Path, marker: Path, zip_format: bool = True) -> None:
    """Write a malicious file at `path`: torch's zip format (as torch.save makes) or a bare pickle."""
    payload = {"model_config": {}, "model": Evil(marker)}
    if zip_format:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(pickle.dumps(payload))


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny data chain and a finished 6-step pretraining run (checkpoints at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("security")
    data = build_data(root)
    run(pretrain_cmd(data, root / "pre", *STEPS))
    return data, root / "pre"


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_malicious_model_file_is_refused_and_runs_nothing(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    model = tmp_path / "model.pt"
    plant_evil(model, marker, zip_format)
    with pytest.raises(ConfigError) as error:
        load_model(model)
    assert str(model) in one_line(error.value) and "refusing to load" in str(error.value)
    assert not marker.exists()


def test_a_model_replaced_in_a_training_folder_is_refused(trained, tmp_path):
    data, pre = trained
    run_dir = copy_run(pre, tmp_path / "pre")
    marker = tmp_path / "pwned"
    plant_evil(run_dir / "model.pt", marker)
    with pytest.raises(ConfigError, match="does not match the sha256") as error:  # the manifest's digest
        load_model(run_dir / "model.pt")
    assert str(run_dir / "model.pt") in one_line(error.value)
    # so does the command line that would reuse the finished run: one line, exit 2, no traceback
    done = run(pretrain_cmd(data, run_dir, *STEPS), returncode=2)
    assert "does not match the sha256" in done.stderr and "Traceback" not in done.stderr
    # an attacker who also rewrites the digest in the manifest meets weights_only
    manifest = json.loads((run_dir / MANIFEST).read_text())
    atomic_write_json(run_dir / MANIFEST, {**manifest, "model_sha256": file_digest(run_dir / "model.pt")})
    with pytest.raises(ConfigError, match="refusing to load") as error:
        load_model(run_dir / "model.pt")
    assert str(run_dir / "model.pt") in one_line(error.value)
    assert not marker.exists()


def test_a_malicious_checkpoint_is_refused_on_resume(trained, tmp_path):
    data, pre = trained
    run_dir = copy_run(pre, tmp_path / "pre")
    (run_dir / MANIFEST).unlink()  # unfinished: the next run resumes from the newest checkpoint
    marker = tmp_path / "pwned"
    newest = run_dir / "checkpoints" / "step_000006.pt"
    plant_evil(newest, marker)
    meta = newest.with_suffix(".json")
    atomic_write_json(meta, {**json.loads(meta.read_text()), "sha256": file_digest(newest)})
    done = run(pretrain_cmd(data, run_dir, *STEPS), returncode=2)
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and str(newest) in lines[0] and "refusing to load" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not marker.exists()


def test_a_planted_checkpoint_without_its_digest_is_skipped_and_removed(trained, tmp_path):
    data, pre = trained
    run_dir = copy_run(pre, tmp_path / "pre")
    (run_dir / MANIFEST).unlink()
    (run_dir / "model.pt").unlink()
    marker = tmp_path / "pwned"
    newest = run_dir / "checkpoints" / "step_000006.pt"
    plant_evil(newest, marker)
    done = run(pretrain_cmd(data, run_dir, *STEPS))
    assert (
        f"skipping corrupt checkpoint {newest}" in done.stderr
        and "resuming from step_000003.pt" in done.stderr
    )
    assert not marker.exists()
    assert_same_weights(run_dir / "model.pt", pre / "model.pt")  # retrained from step 3, bit for bit


def test_the_mlflow_pyfunc_model_refuses_a_malicious_weights_file(trained, tmp_path, monkeypatch):
    import mlflow

    from tasks.tracking import experiment_id, log_generator_model

    data, pre = trained
    monkeypatch.chdir(tmp_path)  # the local store lands in tmp_path/mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = experiment_id("security")  # configures tracking before the first client exists
    run_id = mlflow.MlflowClient().create_run(experiment).info.run_id
    uri = log_generator_model(run_id, pre / "model.pt", data["tokenizer"], chat=False, name="pretrained")
    stored = list((tmp_path / "mlruns").rglob("model.pt"))  # the logged model's weights in the artifact store
    assert stored
    for path in stored:
        plant_evil(path, tmp_path / "pwned")
    with pytest.raises(Exception) as error:
        mlflow.pyfunc.load_model(uri)
    assert "refusing to load" in str(error.value) and "model.pt" in str(error.value)
    assert not (tmp_path / "pwned").exists()


def reverse_one_piece(model: Path) -> str:
    """Reverse one multi-character piece in place: same file length, still a valid model. Returns it."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    pieces = {p.piece for p in proto.pieces}
    for p in proto.pieces:
        if (
            p.type == p.NORMAL
            and len(p.piece) > 2
            and p.piece[::-1] != p.piece
            and p.piece[::-1] not in pieces
        ):
            original, p.piece = p.piece, p.piece[::-1]
            break
    data = proto.SerializeToString()
    assert len(data) == model.stat().st_size
    spm.SentencePieceProcessor(model_proto=data)  # still loads
    model.write_bytes(data)
    return original


def test_a_reversed_tokenizer_piece_is_caught_by_load_and_by_the_command_line(trained, tmp_path):
    data, _ = trained
    tok = copy_run(data["tokenizer"], tmp_path / "tokenizer")
    piece = reverse_one_piece(tok / MODEL_FILE)
    assert piece
    with pytest.raises(ConfigError, match="does not match the sha256") as error:
        Tokenizer.load(tok)
    assert str(tok / MODEL_FILE) in one_line(error.value)
    done = run(
        [
            sys.executable,
            "-m",
            "llmcore.tokenizer",
            "encode",
            "--corpus",
            str(data["corpus"]),
            "--tokenizer",
            str(tok),
            "--out",
            str(tmp_path / "tokens"),
        ],
        returncode=2,
    )
    assert str(tok / MODEL_FILE) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "tokens").exists()


def test_an_unparseable_tokenizer_fails_at_its_own_stage(trained, tmp_path):
    data, _ = trained
    tok = copy_run(data["tokenizer"], tmp_path / "tokenizer")
    model = tok / MODEL_FILE
    model.write_bytes(b"\x0a\xff" + os.urandom(model.stat().st_size - 2))
    with pytest.raises(ConfigError, match="does not match the sha256"):
        Tokenizer.load(tok)
    # with the digest rewritten to match, sentencepiece's parse failure is the one line
    manifest = json.loads((tok / MANIFEST).read_text())
    atomic_write_json(tok / MANIFEST, {**manifest, "tokenizer_digest": file_digest(model)})
    with pytest.raises(ConfigError, match="is not a sentencepiece model") as error:
        Tokenizer.load(tok)
    assert str(model) in one_line(error.value)


def test_the_pipeline_task_rebuilds_a_tampered_tokenizer_and_tokens(trained, tmp_path):
    from prefect.logging import disable_run_logger

    from llmcore.tokenizer import TokenizerConfig
    from tasks import stages

    data, _ = trained
    config = TokenizerConfig(vocab_size=400, num_threads=1)
    runs = str(tmp_path / "runs")
    with disable_run_logger():
        tok = Path(stages.train_tokenizer.fn(str(data["corpus"]), config, runs))
        tokens = Path(stages.encode_corpus(str(data["corpus"]), str(tok), runs))
        original, shard_bytes = (tok / MODEL_FILE).read_bytes(), (tokens / "train_000000.bin").read_bytes()
        key = stages.train_tokenizer.cache_key_fn
        params = {"corpus_dir": str(data["corpus"]), "config": config, "runs_dir": runs}
        assert key(None, params) is not None

        reverse_one_piece(tok / MODEL_FILE)
        assert key(None, params) is None  # no cache hit for a tampered folder: the task runs again
        assert Path(stages.train_tokenizer.fn(str(data["corpus"]), config, runs)) == tok
        assert (tok / MODEL_FILE).read_bytes() == original  # rebuilt, exactly as before

        flipped = bytearray(shard_bytes)
        flipped[10] ^= 0xFF
        (tokens / "train_000000.bin").write_bytes(bytes(flipped))
        with pytest.raises(ConfigError, match="train_000000.bin does not match the sha256"):
            open_split(tokens, "train")
        stages.encode_corpus(str(data["corpus"]), str(tok), runs)  # not reused: its digest check fails
        assert (tokens / "train_000000.bin").read_bytes() == shard_bytes


def test_a_checkpoint_with_a_flipped_byte_is_skipped_for_the_previous_one(tmp_path, caplog):
    from llmcore.checkpoint import resume_state

    for step in (3, 6):
        save_checkpoint(tmp_path, step, {"w": torch.full((1000,), float(step))}, {}, keep=2)
    newest = tmp_path / "step_000006.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, inside the tensor bytes: torch alone would not notice
    newest.write_bytes(bytes(data))
    path, state = resume_state(tmp_path)
    assert path.name == "step_000003.pt" and float(state["w"][0]) == 3.0
    assert not newest.exists() and not newest.with_suffix(".json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(newest) in warnings[0]


UMASK_PROBE = """
import os, stat, sys
from pathlib import Path
os.umask(int(sys.argv[1], 8))
from llmcore.artifacts import atomic_output_dir, atomic_write_bytes
assert os.umask(0o022) == int(sys.argv[1], 8); os.umask(int(sys.argv[1], 8))  # importing left it alone
root = Path(sys.argv[2])
atomic_write_bytes(root / "file.bin", b"x")
with atomic_output_dir(root / "folder") as tmp:
    atomic_write_bytes(tmp / "inner.bin", b"y")
    (tmp / "plain.txt").write_text("z")
mode = lambda p: oct(stat.S_IMODE(p.stat().st_mode))
print(mode(root / "file.bin"), mode(root / "folder"), mode(root / "folder" / "inner.bin"))
"""


@pytest.mark.parametrize("umask, file_mode, dir_mode", [("022", "0o644", "0o755"), ("077", "0o600", "0o700")])
def test_files_and_folders_get_the_users_umask(tmp_path, umask, file_mode, dir_mode):
    done = subprocess.run(
        [sys.executable, "-c", UMASK_PROBE, umask, str(tmp_path)],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [file_mode, dir_mode, file_mode]


def test_the_artifacts_module_never_sets_the_umask():
    source = (ROOT / "llmcore" / "artifacts.py").read_text()
    assert "umask(" not in source and "chmod(" not in source


def _wait_for(predicate, what: str, limit: float = 240.0) -> None:
    deadline = time.monotonic() + limit  # a safety net against a hung child, not a timing assertion
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_two_identical_runs_on_one_folder_train_once(trained, tmp_path):
    """The first holds the lock (frozen with SIGSTOP mid-training, so the overlap is certain); the second
    says who holds it, waits, then reuses the finished result instead of training again."""
    data, pre = trained
    out = tmp_path / "pre"
    with open(tmp_path / "a.log", "w") as a_err:
        a = subprocess.Popen(
            pretrain_cmd(data, out, *STEPS), env=env(), cwd=ROOT, stderr=a_err, stdout=subprocess.DEVNULL
        )
        b = None
    try:
        _wait_for(lambda: list((out / "checkpoints").glob("step_*.json")), "the first run's first checkpoint")
        os.kill(a.pid, signal.SIGSTOP)
        with open(tmp_path / "b.log", "w") as b_err:
            b = subprocess.Popen(
                pretrain_cmd(data, out, *STEPS), env=env(), cwd=ROOT, stderr=b_err, stdout=subprocess.DEVNULL
            )
        _wait_for(
            lambda: "is locked by" in (tmp_path / "b.log").read_text(), "the second run to meet the lock"
        )
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=240) == 0 and b.wait(timeout=240) == 0
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
    a_log, b_log = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    waiting = [line for line in b_log.splitlines() if "is locked by" in line]
    assert len(waiting) == 1 and f"pid {a.pid} on " in waiting[0] and " since " in waiting[0]
    assert "pretrain step 6/6" in a_log and "pretrain step" not in b_log  # only the first trained
    assert "is finished, reusing it" in b_log
    assert_same_weights(out / "model.pt", pre / "model.pt")


def test_two_runs_with_different_settings_at_once_both_complete(trained, tmp_path):
    data, pre = trained
    outs = {"a": tmp_path / "runs" / "a", "b": tmp_path / "runs" / "b"}
    procs = {
        "a": subprocess.Popen(
            pretrain_cmd(data, outs["a"], *STEPS),
            env=env(),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ),
        "b": subprocess.Popen(
            pretrain_cmd(data, outs["b"], *STEPS, "--seed", "7"),
            env=env(),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ),
    }
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert_same_weights(outs["a"] / "model.pt", pre / "model.pt")
    seeds = [json.loads((outs[n] / MANIFEST).read_text())["identity"]["train"]["seed"] for n in "ab"]
    assert seeds == [1337, 7]
    wa = torch.load(outs["a"] / "model.pt", weights_only=True)["model"]
    wb = torch.load(outs["b"] / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # b trained its own model, not a's
    assert (
        hashlib.sha256((outs["b"] / "model.pt").read_bytes()).hexdigest()
        == json.loads((outs["b"] / MANIFEST).read_text())["model_sha256"]
    )
