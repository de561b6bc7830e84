"""Which torch device a stage runs on, and what that device can do: precision and peak FLOP/s.

`auto` means CUDA when present, else CPU. Named devices are checked when a config is built, so
`--device cudax` or `--device cuda` on a machine without CUDA fails at once with a one-line error, not in
the middle of a run. `resolve_precision` turns `--precision` into an autocast dtype for a device;
`peak_flops` finds a GPU's dense 16-bit peak by its name, for MFU. This module does not train.
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def require_precision(name: str) -> None:
    """ConfigError unless `name` is one of PRECISIONS."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}: pass --precision one of {', '.join(PRECISIONS)}")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of training on `device` (float32: no autocast).

    auto: bf16 on a CUDA device that supports it, fp16 (with a gradient scaler, see `llmcore.train`) on one
    that does not, fp32 elsewhere. bf16 and fp16 autocast also run on CPU, which is how the mixed-precision
    path is tested without a GPU; asking for bf16 on a GPU without it is refused.
    """
    require_precision(name)
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if (
        name == "bf16"
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise ConfigError(
            f"{torch.cuda.get_device_name(device)} has no bf16 arithmetic: pass --precision fp16 or auto"
        )
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Elsewhere bf16 is emulated, slower
    than fp32. torch exposes the check only privately, so a torch without it answers no."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# Dense (no sparsity) 16-bit tensor-core peaks in FLOP/s from NVIDIA's datasheets: bf16, or fp16 on GPUs
# without bf16 (V100, T4), where `auto` trains in fp16. Keys are matched as whole words in the device
# name, longest first, so "H100 PCIe" wins over "H100", and "L4" matches neither "L40S" nor "L40".
PEAK_FLOPS = {
    "B200": 2250e12,
    "GB200": 2500e12,
    "B100": 1750e12,
    "H200": 989e12,  # SXM; torch names it "NVIDIA H200"
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "H100": 989e12,  # SXM; torch names it "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "H800 PCIe": 756e12,
    "H20": 148e12,
    "A100": 312e12,  # SXM and PCIe alike
    "A800": 312e12,
    "A40": 150e12,
    "A30": 165e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16, SXM2
    "V100-PCIE": 112e12,
    "V100S": 130e12,
    "T4": 65e12,  # fp16
}


def peak_flops(device_name: str) -> tuple[str, float] | None:
    """(table entry, dense 16-bit peak FLOP/s) of a GPU by its full name, or None for an unknown one: MFU
    against a guessed peak would be a wrong figure, so unknown devices get none."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name, re.IGNORECASE):
            return key, PEAK_FLOPS[key]
    return None
