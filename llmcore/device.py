"""Which torch device a stage runs on: `auto` means CUDA when present, else CPU.

Named devices are checked when a config is built, so `--device cudax` or `--device cuda` on a machine
without CUDA fails at once with a one-line error, not in the middle of a run.
"""

import re

import torch

from llmcore.errors import ConfigError


def require_device(name: str) -> None:
    """ConfigError unless `name` is auto, cpu, mps, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(name)):
        raise ConfigError(f"unknown device {name!r}: pass --device auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    require_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} requested but CUDA is not available here: pass --device cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s): pass --device cuda:0..cuda:{torch.cuda.device_count() - 1} or auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device {name!r} requested but MPS is not available here: pass --device cpu or auto"
        )
    return device
