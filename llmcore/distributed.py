"""Training on many processes: torchrun's environment, the process group, DDP or FSDP2 wrapping, and the
few collectives the training loop needs.

torchrun (`torchrun --nproc-per-node N -m llmcore.train ...`) starts one process per device and gives
each its RANK, LOCAL_RANK and WORLD_SIZE; `setup` joins them into a process group (gloo on CPU, NCCL on
CUDA with each rank on cuda:LOCAL_RANK). Outside torchrun every helper here is the identity for one
process, so the training loop has one code path and a single-process run is unchanged. The model file
stays single-device: `wrap` adds DistributedDataParallel (gradients all-reduced after the last
micro-step's backward) or FSDP2's `fully_shard` on a copy (parameters, gradients and optimizer state
sharded, gathered block by block for forward and backward). Checkpoint state is always full and in the
single-process layout, so a run resumes under any world size that divides its batch, with or without
FSDP. `LaunchConfig` and `torchrun_command` describe a launch for the orchestration layer.

This module does not read data, train, or write files.
"""

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmcore.artifacts import json_digest
from llmcore.errors import ConfigError, require_positive


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job; one process outside torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that checkpoints, writes the final model and logs metrics."""
        return self.rank == 0


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun), readable before `setup`."""
    return int(os.environ.get("RANK", "0"))


def log_level() -> int:
    """INFO on rank 0; WARNING on the other ranks, whose progress lines would repeat rank 0's."""
    return logging.INFO if env_rank() == 0 else logging.WARNING


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join torchrun's process group (once per process) and return this rank's context and device.

    On CUDA each rank takes cuda:LOCAL_RANK, whatever index `device` named.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(), device
    context = Context(env_rank(), int(os.environ["LOCAL_RANK"]), world)
    if device.type == "cuda":
        if context.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {context.rank} needs cuda:{context.local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): pass --nproc-per-node <= "
                f"{torch.cuda.device_count()}"
            )
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"torchrun training runs on cpu or cuda, not {device}: pass --device cpu or cuda")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return context, device


def close() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def require_same(context: Context, parts: dict[str, Any]) -> None:
    """ConfigError on every rank unless all ranks hold equal `parts` (compared by digest, all-gathered)."""
    if context.world_size == 1:
        return
    mine = {name: json_digest(value) for name, value in parts.items()}
    everyone: list[dict[str, str] | None] = [None] * context.world_size
    dist.all_gather_object(everyone, mine)
    differ = sorted({name for other in everyone for name in mine if other[name] != everyone[0][name]})
    if differ:
        ranks = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
        raise ConfigError(
            f"ranks {', '.join(map(str, ranks))} disagree with rank 0 on {', '.join(differ)}: launch every "
            "rank with the same flags, data and checkpoint folder (a shared --out on every node)"
        )


def local_rows(context: Context, batch_size: int) -> slice:
    """This rank's rows of every global micro-batch of `batch_size` rows: an equal, contiguous share."""
    if batch_size % context.world_size:
        raise ConfigError(
            f"batch_size {batch_size} does not split over {context.world_size} processes: pass "
            f"--batch-size a multiple of {context.world_size} (it is the global micro-batch; each process "
            "reads its share)"
        )
    share = batch_size // context.world_size
    return slice(context.rank * share, (context.rank + 1) * share)


def total(context: Context, value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all ranks (a copy; `value` itself is left alone)."""
    value = value.clone()
    if context.world_size > 1:
        dist.all_reduce(value)
    return value


def wrap(model: nn.Module, context: Context, device: torch.device, fsdp: bool) -> nn.Module:
    """The module to train: `model` on `device` alone, in DDP (sharing `model`'s parameters), or with
    `fsdp` a copy of it sharded per block with FSDP2 (`model` stays where it is until `finish`)."""
    if context.world_size == 1:
        return model.to(device)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        sharded = copy.deepcopy(model)
        for block in sharded.blocks:  # one all-gather per block keeps the peak at one block's weights
            fully_shard(block)
        fully_shard(sharded)
        return sharded.to(device)
    return nn.parallel.DistributedDataParallel(
        model.to(device), device_ids=[device.index] if device.type == "cuda" else None
    )


def no_sync(trained: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around one micro-step's forward and backward: all-reduce its gradients only when `sync` (the last
    micro-step of an optimizer step); the others accumulate locally."""
    if isinstance(trained, nn.parallel.DistributedDataParallel) and not sync:
        return trained.no_sync()
    if hasattr(trained, "set_requires_gradient_sync"):  # FSDP2
        trained.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def unwrap(trained: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (an FSDP module is its own model)."""
    return trained.module if isinstance(trained, nn.parallel.DistributedDataParallel) else trained


def shared_scores(
    context: Context,
    trained: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    score: Callable[[nn.Module, Sequence[tuple[torch.Tensor, torch.Tensor]]], dict[str, float]],
    device: torch.device,
) -> dict[str, float]:
    """`score` (llmcore.losses.token_loss over a model and batches) of a validation pass, the work shared.

    Under DDP each rank scores its share of the batches through the unwrapped model (a forward without
    collectives) and the sums of loss, tokens, bits and bytes are all-reduced. Under FSDP2 every rank
    scores every batch: each forward gathers the sharded weights, so all ranks must run the same forwards.
    """
    if context.world_size == 1 or _is_sharded(trained):
        return score(trained, batches)
    mine = score(unwrap(trained), batches[context.rank :: context.world_size])
    sums = torch.tensor(
        [
            mine["loss"] * mine["tokens"],
            mine["tokens"],
            mine.get("bpb", 0.0) * mine.get("bytes", 0.0),
            mine.get("bytes", 0.0),
        ],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(sums)
    loss_sum, tokens, bits, nbytes = sums.tolist()
    result = {"loss": loss_sum / max(1.0, tokens), "tokens": tokens}
    if nbytes:
        result.update(bpb=bits / nbytes, bytes=nbytes)
    return result


def grad_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (FSDP2 returns it as a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _is_sharded(trained: nn.Module) -> bool:
    return hasattr(trained, "set_requires_gradient_sync")


def _fqns(trained: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order: index i of a single-process state is fqns[i]."""
    names = {id(p): name for name, p in unwrap(trained).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(trained: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state, unsharded on CPU, in the single-process layout. Under FSDP every rank
    must call it (it gathers the shards) and only rank 0 gets the state; the others get empty dicts."""
    if not _is_sharded(trained):
        return unwrap(trained).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        trained, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not optim_state:  # not rank 0
        return model_state, optim_state
    index = {name: i for i, name in enumerate(_fqns(trained, optimizer))}
    optim_state = {
        "state": {index[name]: value for name, value in optim_state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in optim_state["param_groups"]
        ],
    }
    return model_state, optim_state


def load_full_state(
    trained: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Load state written by `full_state` (any world size, with or without FSDP) on every rank."""
    if not _is_sharded(trained):
        unwrap(trained).load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = _fqns(trained, optimizer)
    optim_state = {
        "state": {names[i]: value for i, value in optim_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]} for group in optim_state["param_groups"]
        ],
    }
    set_state_dict(
        trained,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )


def finish(trained: nn.Module, model: nn.Module) -> None:
    """Leave the trained weights in `model` (a no-op unless `trained` is a sharded copy, whose full weights
    are gathered on rank 0 only: the rank that saves them)."""
    if _is_sharded(trained) and trained is not model:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if state:
            model.load_state_dict(state)


@dataclass(frozen=True)
class LaunchConfig:
    """How many processes train, and where: torchrun's own flags."""

    nnodes: int = 1  # machines; each runs the same launch, the rendezvous assigns ranks
    nproc_per_node: int = 1  # processes (devices) per machine
    rdzv_endpoint: str | None = None  # host:port every node reaches; None = one machine (--standalone)

    def __post_init__(self):
        require_positive("nnodes", self.nnodes)
        require_positive("nproc_per_node", self.nproc_per_node)
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(
                f"{self.nnodes} nodes need a rendezvous endpoint every node reaches: pass "
                "--rdzv-endpoint HOST:PORT (the same on every node)"
            )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def torchrun_command(launch: LaunchConfig, module: str, args: list[str], python: str) -> list[str]:
    """The command line that runs `python -m module args` under torchrun on this node."""
    where = (
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint]
        if launch.rdzv_endpoint
        else ["--standalone"]
    )
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(launch.nnodes),
        "--nproc-per-node",
        str(launch.nproc_per_node),
        *where,
        "-m",
        module,
        *args,
    ]
