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
        raise ConfigError(f"device {name!r} requested but CUDA is not available here: pass --device cpu or auto")
    return device
