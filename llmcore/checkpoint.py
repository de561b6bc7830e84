"""Training checkpoints and final models: written atomically, verified and loaded safely, pruned.

A checkpoint is `step_000500.pt` (model, optimizer, step, RNG state, data position, configs) with
`step_000500.json` beside it (the same metadata without tensors, plus the `.pt` file's sha256). The `.pt`
file is renamed into place only when fully written, and its JSON after it, so a checkpoint counts only
once both exist. Every load is `torch.load(weights_only=True)`: tensors and plain data only, so a file
crafted to run code is refused, never executed. A checkpoint whose bytes no longer match its digest is
corrupt: resuming skips it (and removes it) for the previous good one. This module does not decide when
to checkpoint; the training loop does.
"""

import hashlib
import io
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from llmcore.artifacts import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    remove_stale_temps,
    verify_digest,
)
from llmcore.errors import ConfigError

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


class CorruptCheckpoint(ConfigError):
    """A checkpoint or model file that is truncated, unreadable or not the bytes its digest says."""


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:06d}.pt"


def save_checkpoint(
    folder: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write `state` (torch.save) and `meta` (JSON, with the sha256 of the `.pt`) for `step`, then delete
    all but the newest `keep`."""
    path = checkpoint_path(folder, step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    atomic_write_json(
        path.with_suffix(".json"), {**meta, "step": step, "sha256": hashlib.sha256(data).hexdigest()}
    )
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (both files present), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and p.with_suffix(".json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _safe_load(path: Path, map_location: str | torch.device, mmap: bool = False) -> Any:
    """torch.load of tensors and plain data only: a pickle that would build other objects is refused.
    `mmap` maps the tensors instead of reading them, for callers that want only the plain data."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"refusing to load {path}: it holds objects other than tensors and plain data, which "
            "could run code (torch's weights_only load refused it): delete it and rerun the stage that "
            "wrote it, and do not load files from untrusted sources"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CorruptCheckpoint(
            f"{path} is truncated or corrupt ({str(error).splitlines()[0][:80]}): delete it "
            "and rerun the stage that wrote it"
        ) from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or the newest in a folder) after checking it against the digest in its JSON."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ConfigError(
                f"no checkpoint in {path}: run the training stage first or pass a checkpoint file"
            )
        path = found
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {path} does not exist: run the training stage first or pass an existing file"
        )
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            verify_digest(
                path,
                read_json(meta).get("sha256"),
                meta,
                f"delete it and {meta.name} to resume from the checkpoint before it",
            )
        except ConfigError as error:
            raise CorruptCheckpoint(str(error)) from None
    return _safe_load(path, map_location)


def resume_state(
    folder: Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that is intact, and its state; None when there is none.

    First removes the temporary files that a killed write left. A corrupt checkpoint (truncated, or not
    matching its digest) is removed with one warning line naming it, and the one before it is tried. A file
    that would run code is not skipped: that is a ConfigError, since someone put it there.
    """
    remove_stale_temps(Path(folder))
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path, map_location)
        except CorruptCheckpoint as error:
            log.warning("skipping corrupt checkpoint %s (removed): %s", path, error)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
    return None


def save_model(path: Path, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> str:
    """Write the final weights with the model config, atomically: what later stages load. Returns the
    file's sha256, for the manifest that `load_model` checks it against."""
    from dataclasses import asdict

    buffer = io.BytesIO()
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(), **(extra or {})}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def verify_model(path: Path) -> None:
    """ConfigError unless `path` matches the `model_sha256` of the manifest beside it (when that manifest
    describes it): a model file in a training folder is trusted only as written."""
    path = Path(path)
    manifest = path.with_name(MANIFEST)
    if manifest.is_file() and (recorded := read_json(manifest)).get("model") == path.name:
        verify_digest(
            path,
            recorded.get("model_sha256"),
            manifest,
            f"delete {manifest} and rerun training to rewrite it from the last checkpoint",
        )


def read_model_meta(path: Path) -> dict[str, Any]:
    """What `save_model` stored beside the weights: `model_config` and its `extra` (a fine-tuned model's
    `chat` and `max_length`). The weights are memory-mapped, not read, and the digest is not checked:
    whoever uses the weights loads them with `load_model`, which checks it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist: run pretraining (or fine-tuning) first")
    state = _safe_load(path, "cpu", mmap=True)
    if not isinstance(state, dict) or "model_config" not in state:
        raise ConfigError(
            f"{path} is not a model written by llmcore (no model_config): pass a model.pt "
            "from pretraining or fine-tuning"
        )
    return {k: v for k, v in state.items() if k != "model"}


def load_model(path: Path, device: str | torch.device = "cpu"):
    """Load a model written by `save_model`, in eval mode, after checking it against its manifest."""
    from llmcore.model import GPT, GPTConfig

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist: run pretraining (or fine-tuning) first")
    verify_model(path)
    state = _safe_load(path, device)
    if not isinstance(state, dict) or "model_config" not in state or "model" not in state:
        raise ConfigError(
            f"{path} is not a model written by llmcore (no model_config/model): pass a model.pt "
            "from pretraining or fine-tuning"
        )
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()
