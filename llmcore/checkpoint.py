"""Training checkpoints: written atomically, found again on restart, pruned to the newest few.

A checkpoint is `step_000500.pt` (model, optimizer, step, RNG state, data position, configs) with
`step_000500.json` beside it (the same metadata without tensors, for people and tools). The `.pt` file
is renamed into place only when fully written, and its JSON after it, so a checkpoint counts only once
both exist. This module does not decide when to checkpoint; the training loop does.
"""

import io
import re
from pathlib import Path
from typing import Any

import torch

from llmcore.artifacts import atomic_write_bytes, atomic_write_json
from llmcore.errors import ConfigError

_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:06d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (torch.save) and `meta` (JSON) for `step`, then delete all but the newest `keep`."""
    path = checkpoint_path(folder, step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_json(path.with_suffix(".json"), {**meta, "step": step})
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


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ConfigError(f"no checkpoint in {path}: run the training stage first or pass a checkpoint file")
        path = found
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: run the training stage first or pass an existing file")
    return torch.load(path, map_location=map_location, weights_only=False)


def save_model(path: Path, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Write the final weights with the model config, atomically: what later stages load."""
    from dataclasses import asdict

    buffer = io.BytesIO()
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(), **(extra or {})}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_model(path: Path, device: str | torch.device = "cpu"):
    """Load a model written by `save_model`, in eval mode."""
    from llmcore.model import GPT, GPTConfig

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist: run pretraining (or fine-tuning) first")
    state = torch.load(path, map_location=device, weights_only=False)
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()
