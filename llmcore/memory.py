"""Will a training step fit in memory? An estimate made before anything is allocated.

`training_bytes` estimates the peak memory of one training step of the GPT in `llmcore.model` with AdamW:
weights, gradients and the two AdamW moments (16 bytes per parameter in fp32), the activations saved for
the backward pass of one micro-batch (with activation checkpointing: each block's input, and one block's
activations while it is recomputed), and the logits of one chunk of the loss (`llmcore.losses`) with their
gradients, plus the output projection's gradient that the loss computes.
`require_fits` compares that with the memory free on the device (RAM, honouring a cgroup limit, or
CUDA's free memory) and raises a `ConfigError` naming what to lower. It does not measure anything while
training, and it does not cover evaluation or sampling (no gradients, a fraction of the training peak).

The activation coefficients were measured on CPU (fp32, peak RSS of real steps, 11 configs from
0.09M to 4.3M parameters, 2k-16k tokens per micro-batch; least squares gave 26.5 width-sized vectors per
token per block, 23 outside the blocks, 3.85 vocabulary-sized vectors per token and ~95 MB fixed) and
are rounded up here, so the estimate errs high by about 10-20%. It counts memory the step allocates, not
the pages of torch's own code that its first kernels fault in: those are clean file pages (reclaimable,
shared between processes), and how many a fault maps depends on the page cache and the file system (18 to
28 MB of the smoke shape's 270 MB peak on the dev machine).

    python -m llmcore.memory --vocab-size 2048 --block-size 128 --n-layer 2 --n-embd 128 --batch-size 16
"""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcore.errors import ConfigError
from llmcore.losses import LOGITS_PER_CHUNK
from llmcore.model import GPTConfig

PER_BLOCK = 30  # n_embd-sized vectors saved per token per block: norms, qkv, rotary, attention out, SwiGLU
OUTSIDE_BLOCKS = 24  # n_embd-sized vectors per token outside the blocks: embedding, final norm, gradients
PER_VOCAB = 4  # vocabulary-sized vectors per token: logits, log-softmax, and the gradients of both
FIXED = 128 * 2**20  # allocator, thread pools and kernels' scratch space


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one training step, by part."""

    states: int  # weights, gradients, AdamW moments
    activations: int  # saved for backward, per micro-batch
    logits: int  # one chunk of logits and their gradients, and the output projection's gradient

    @property
    def total(self) -> int:
        return self.states + self.activations + self.logits + FIXED


def num_params(config: GPTConfig) -> int:
    """Parameters of `llmcore.model.GPT` for `config`, counted without building it (norm weights included)."""
    c, kv = config.n_embd, config.kv_heads * config.head_dim
    attention = c * (c + 2 * kv) + c * c
    mlp = 3 * c * config.mlp_hidden
    embeddings = config.vocab_size * c * (1 if config.tie_embeddings else 2)
    return config.n_layer * (attention + mlp + 2 * c) + embeddings + c


def training_bytes(
    config: GPTConfig,
    batch_size: int,
    sequence_length: int,
    device: torch.device,
    activation_checkpointing: bool = False,
) -> Estimate:
    """Estimated peak memory of one optimizer step on micro-batches of batch_size x sequence_length."""
    tokens = batch_size * sequence_length
    activation_bytes = 2 if device.type == "cuda" else 4  # bf16 autocast on CUDA, fp32 elsewhere
    blocks = config.n_layer + PER_BLOCK if activation_checkpointing else config.n_layer * PER_BLOCK
    chunk_rows = min(tokens, max(1, LOGITS_PER_CHUNK // config.vocab_size))
    return Estimate(
        states=16 * num_params(config),
        activations=tokens * (blocks + OUTSIDE_BLOCKS) * config.n_embd * activation_bytes,
        logits=(chunk_rows * PER_VOCAB + config.n_embd) * config.vocab_size * 4,  # float32
    )


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1); None without a limit."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and int(cap) < 2**60:  # "max" or a huge number mean no limit
            return int(cap) - int(used)
    return None


def available_bytes(device: torch.device) -> int:
    """Memory free for a new allocation: CUDA's free memory, or available RAM (MemAvailable, cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # MemAvailable counts reclaimable page cache, which MemFree (sysconf) does not
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    cgroup = _cgroup_free()
    return min(free, cgroup) if cgroup is not None else free


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def require_fits(
    config: GPTConfig,
    batch_size: int,
    sequence_length: int,
    device: torch.device,
    stage: str = "training",
    activation_checkpointing: bool = False,
) -> Estimate:
    """ConfigError, naming what to lower, unless one training step fits the memory free on `device`."""
    estimate = training_bytes(config, batch_size, sequence_length, device, activation_checkpointing)
    free = available_bytes(device)
    if estimate.total > free:
        fits = max(
            0, int(batch_size * (free - estimate.states - FIXED) / (estimate.total - estimate.states - FIXED))
        )
        raise ConfigError(
            f"{stage} needs about {_gib(estimate.total)} on {device} "
            f"(batch {batch_size} x {sequence_length} tokens: "
            f"{_gib(estimate.activations + estimate.logits)} activations and logits, "
            f"{_gib(estimate.states)} weights "
            f"and optimizer) but {_gib(free)} is free: lower --batch-size (to {fits} or less) "
            f"or --block-size, "
            "or raise --grad-accum-steps to keep the tokens per step"
            + ("" if activation_checkpointing else ", or pass --activation-checkpointing")
        )
    return estimate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmcore.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=GPTConfig.block_size)
    parser.add_argument("--n-layer", type=int, default=GPTConfig.n_layer)
    parser.add_argument("--n-head", type=int, default=GPTConfig.n_head)
    parser.add_argument("--n-embd", type=int, default=GPTConfig.n_embd)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = vars(parser.parse_args(argv))
    batch_size, device = args.pop("batch_size"), torch.device(args.pop("device"))
    try:
        config = GPTConfig(**args)
        estimate = training_bytes(config, batch_size, config.block_size, device)
    except ConfigError as error:
        parser.error(str(error))
    print(
        f"{num_params(config):,} parameters; estimated peak {_gib(estimate.total)} ({estimate}); "
        f"free on {device}: {_gib(available_bytes(device))}"
    )


if __name__ == "__main__":
    main()
