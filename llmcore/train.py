"""Pretraining, and the one training loop that fine-tuning reuses.

`fit` is the loop, in visible order: set the learning rate, forward, backward, clip, step, evaluate,
checkpoint, log. It resumes from the newest checkpoint in its folder, so rerunning a killed run continues
where it stopped; on CPU a resumed run is bit-identical to an uninterrupted one. `pretrain` feeds it
windows of the token shards. Precision (`--precision`: bf16 or fp16 autocast, fp16 with a gradient scaler),
`torch.compile`, activation checkpointing and the fused optimizer are chosen here by device; the model file
stays single-device fp32 code. Batches are read ahead on a background thread, and a step reads nothing
back from the device except at log, evaluation and checkpoint steps. Under torchrun the same loop trains
each rank's share of every batch through `llmcore.distributed` (DDP, or FSDP2 with --fsdp), and rank 0
alone checkpoints, logs and writes the model. This module does not create MLflow runs or Prefect tasks; it
reports through a `Tracker`.

    python -m llmcore.train --tokenizer DIR --tokens DIR --out DIR --max-steps 200
    torchrun --standalone --nproc-per-node 2 -m llmcore.train ... --device cpu
"""

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from llmcore import distributed
from llmcore.artifacts import MANIFEST, atomic_write_json, is_finished, locks_folder, read_json
from llmcore.batches import Batches, Prefetcher, token_windows
from llmcore.chat import IGNORE
from llmcore.checkpoint import latest_checkpoint, resume_state, save_checkpoint, save_model, verify_model
from llmcore.cli import add_config_flags, given
from llmcore.device import peak_flops, require_device, require_precision, resolve_device, resolve_precision
from llmcore.errors import (
    ConfigError,
    require_choice,
    require_fraction,
    require_non_negative,
    require_positive,
)
from llmcore.losses import token_loss
from llmcore.memory import require_fits
from llmcore.model import GPT, GPTConfig
from llmcore.optim import OPTIMIZERS, build_optimizer
from llmcore.shards import open_split
from llmcore.tokenizer import Tokenizer
from llmcore.tracking import NullTracker, Tracker, env_tracker

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 200  # optimizer steps (ignored when max_tokens is set)
    max_tokens: int | None = None  # token budget; when set, steps = ceil(max_tokens / tokens per step)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    warmup_steps: int = 20  # linear warmup from ~0 to learning_rate
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 50  # steps between validation passes (and at the end)
    eval_batches: int = 8  # validation micro-batches per pass
    checkpoint_interval: int = 100  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_interval: int = 10  # steps between metric logs
    seed: int = 1337  # model init and data order
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N
    compile: bool | None = None  # torch.compile; None = on CUDA only
    # auto | fp32 | bf16 | fp16 autocast; auto = bf16 on CUDA, fp16 + gradient scaling on GPUs without bf16,
    # fp32 elsewhere
    precision: str = "auto"
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2), not DDP
    optimizer: str = (
        "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest: llmcore.optim)
    )
    lr_schedule: str = "cosine"  # cosine | wsd (warmup, stable at the peak, linear cooldown at the end)
    cooldown_fraction: float = 0.2  # wsd: share of the steps spent decaying to learning_rate * min_lr_ratio
    # pretraining: each epoch after the first reads its windows a seeded number of tokens later
    # (llmcore.batches.token_windows), so that text seen again comes after other context
    shift_windows: bool = False
    # instruction tuning: batches of pairs of like length, so that they hold less padding (llmcore.batches)
    group_by_length: bool = False

    def __post_init__(self):
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum_steps",
            "learning_rate",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
            "keep_checkpoints",
            "log_interval",
        ):
            require_positive(name, getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio", "seed"):
            require_non_negative(name, getattr(self, name))
        if self.max_tokens is not None:
            require_positive("max_tokens", self.max_tokens)
        if self.min_lr_ratio > 1:
            raise ConfigError(
                f"min_lr_ratio must be <= 1, got {self.min_lr_ratio}: pass --min-lr-ratio in [0, 1]"
            )
        require_device(self.device)
        require_precision(self.precision)
        require_choice("optimizer", self.optimizer, OPTIMIZERS)
        require_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        require_fraction("cooldown_fraction", self.cooldown_fraction)
        if self.fsdp and self.optimizer == "muon":
            raise ConfigError(
                "--fsdp shards each matrix, but Muon orthogonalises whole matrices: pass --optimizer adamw "
                "with --fsdp, or train without --fsdp (DDP)"
            )

    def total_steps(self, block_size: int) -> int:
        """Optimizer steps this run takes: max_steps, or the token budget divided by tokens per step."""
        if self.max_tokens is None:
            return self.max_steps
        return max(1, math.ceil(self.max_tokens / (self.batch_size * self.grad_accum_steps * block_size)))


# Fields that change how a run is executed or reported, not what it computes: a run may resume under
# different values of these. Precision, like the device, changes the rounding, not the recipe: a run may
# move to a device whose `auto` precision differs.
EXECUTION_FIELDS = (
    "device",
    "compile",
    "precision",
    "activation_checkpointing",
    "fsdp",
    "eval_interval",
    "eval_batches",
    "checkpoint_interval",
    "keep_checkpoints",
    "log_interval",
)


def result_fields(config: TrainConfig) -> dict[str, Any]:
    """The config fields that determine the trained weights (for resume checks and cache keys)."""
    ignored = EXECUTION_FIELDS + (("max_steps",) if config.max_tokens is not None else ())
    return {k: v for k, v in asdict(config).items() if k not in ignored}


def run_identity(model: GPTConfig, config: TrainConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: model, recipe and input digests. Stored in every checkpoint
    and manifest, and compared before resuming or reusing."""
    return {"model": asdict(model), "train": result_fields(config), "inputs": inputs}


def require_same_run(where: Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    """ConfigError if the checkpoint or finished run in `where` was made with another model, recipe or
    data."""
    # a field added to a config after the run was stored counts as its default, so that runs stored by
    # an earlier version of this code still resume
    defaults = {"model": _defaults(GPTConfig), "train": _defaults(TrainConfig)}
    changed = [
        f"{part}.{key}"
        for part in expected
        for key in sorted(set(expected[part]) | set(stored.get(part, {})))
        if stored.get(part, {}).get(key, defaults.get(part, {}).get(key)) != expected[part].get(key)
    ]
    if changed:
        raise ConfigError(
            f"{where} holds a run with different {', '.join(changed)}: pass another --out "
            "(or delete it) to start a new run, or the same settings and data to resume it"
        )


def _defaults(config_class: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN or infinite; the last good checkpoint is kept."""


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to learning_rate * min_lr_ratio at the last step; or, for "wsd",
    the peak held until the last cooldown_fraction of the steps, which decay linearly to that floor."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "wsd":
        cooldown = max(1, round(config.cooldown_fraction * total_steps))
        left = min(1.0, (total_steps - step - 1) / cooldown)  # 1 while stable, then down to 0 at the end
        return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * left)
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _mfu_peak(device: torch.device) -> tuple[str, float | None]:
    """What MFU is measured against on `device` (for the log) and the peak FLOP/s, None where unknown."""
    if device.type != "cuda":
        return f"no MFU on {device.type}", None
    name = torch.cuda.get_device_name(device)
    found = peak_flops(name)
    if found is None:
        return f"no MFU: {name} is not in llmcore.device.PEAK_FLOPS", None
    key, flops = found
    return f"{name} as {key}, dense 16-bit peak {flops / 1e12:.0f} TFLOP/s", flops


def _out_of_memory(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_counts(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int | None) -> tuple[int, int]:
    """The scored targets of (input, target) batches, which weigh the loss, and the tokens tokens/s counts:
    the same targets, or with `pad_id` (a classifier's rows, one target each) the inputs other than it."""
    targets = sum(int((y != IGNORE).sum()) for _, y in batches)
    return targets, targets if pad_id is None else sum(int((x != pad_id).sum()) for x, _ in batches)


def fit(
    model: GPT,
    train_batches: Batches,
    val_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    checkpoint_dir: Path,
    *,
    token_bytes: torch.Tensor | None = None,
    tracker: Tracker = NullTracker(),
    stage: str = "pretrain",
    sequence_length: int | None = None,
    inputs: dict[str, Any] | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """Train `model` in place for config.total_steps, resuming from checkpoint_dir; return final metrics.

    sequence_length (default: the model's context) sizes a token budget; `inputs` (digests of the data)
    joins the model and recipe in the identity a checkpoint must match to be resumed. `pad_id`, for
    batches of one target per row (classification): tokens/s and MFU count the inputs other than it.
    """
    # Under torchrun each rank trains its share of every global micro-batch; rank 0 alone logs and writes.
    context, device = distributed.setup(resolve_device(config.device))
    dtype = resolve_precision(config.precision, device)
    identity = run_identity(model.config, config, inputs or {})
    distributed.require_same(context, {"config": identity})  # before DDP compares shapes its own way
    rows = distributed.local_rows(context, config.batch_size)
    tracker = tracker if context.is_main else NullTracker()
    block = sequence_length or model.config.block_size
    total_steps = config.total_steps(block)
    require_fits(model.config, rows.stop - rows.start, block, device, stage, config.activation_checkpointing)
    for module in model.modules():  # the GPT itself, or inside a classifier or an adapter wrapper
        if isinstance(module, GPT):
            module.activation_checkpointing = config.activation_checkpointing
    trained = distributed.wrap(model, context, device, config.fsdp)  # `model` itself on one process
    optimizer = build_optimizer(
        trained, config.optimizer, config.learning_rate, (config.beta1, config.beta2), config.weight_decay
    )
    # fp16 gradients underflow: the scaler multiplies the loss up, divides the gradients back before
    # clipping, and skips a step whose gradients overflowed. Disabled, each of its calls does nothing.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start_step, history = 0, {}
    resumed = resume_state(checkpoint_dir, map_location="cpu")  # RNG states must stay CPU tensors
    if resumed is not None:
        latest, state = resumed
        require_same_run(latest, state["identity"], identity)
        distributed.load_full_state(trained, optimizer, state["model"], state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start_step, history = state["step"], state.get("metrics", {})
        log.info("%s: resuming from %s (step %d of %d)", stage, latest.name, start_step, total_steps)
    distributed.require_same(context, {"resumed step": start_step})

    use_compile = config.compile if config.compile is not None else device.type == "cuda"
    forward = torch.compile(trained) if use_compile else trained
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    mfu_basis, peak = _mfu_peak(device)
    peak = peak * context.world_size if peak else peak  # tokens/s below counts every rank's tokens
    precision = PRECISION_NAMES[dtype]
    tracker.log_params({stage: {"precision_used": precision, "mfu_peak": mfu_basis}})
    log.info(
        "%s: %s on %s%s%s; MFU: %s",
        stage,
        precision + (" with gradient scaling" if scaler.is_enabled() else ""),
        device,
        ", compiled" if use_compile else "",
        ", activation checkpointing" if config.activation_checkpointing else "",
        mfu_basis,
    )
    metrics: dict[str, float] = dict(history)
    started = time.perf_counter()
    # Throughput over the steps since the last log, evaluations and checkpoints excluded. The clock is read
    # where the host waits for the device anyway (reading the loss) or where it is made to (before an
    # evaluation or checkpoint), never inside a step.
    window_tokens, window_steps, window_seconds, segment_started = 0, 0, 0.0, started
    # Step of the first non-finite loss or gradient, kept on the device (-1: none) and read at the steps
    # that log, evaluate or checkpoint, so no checkpoint ever holds weights trained past it.
    first_bad = torch.full((), -1, device=device)
    skip_bad_grad = scaler.is_enabled()  # an fp16 overflow is the scaler's to skip, not a divergence

    # Reads ahead on a thread, stopped and joined however the loop ends: a thread left running in torch
    # when the process exits aborts it ("terminate called without an active exception").
    batches = Prefetcher(train_batches, start_step * config.grad_accum_steps, device.type == "cuda", rows)
    try:
        for step in range(start_step, total_steps):
            lr = learning_rate_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            trained.train()
            loss_sum = torch.zeros((), device=device)
            micro_batches = [
                batches.get(step * config.grad_accum_steps + m) for m in range(config.grad_accum_steps)
            ]
            # Every trained target weighs the same, however the step's targets fall into micro-batches
            # and ranks: 2 x 4 accumulation is one batch of 8 even when padding leaves micro-batches with
            # different token counts. Counted on the host copies: no device sync on one process.
            tokens, seen = token_counts(micro_batches, pad_id)
            if context.world_size > 1:
                both = distributed.total(context, torch.tensor([tokens, seen], device=device))
                tokens, seen = both.tolist()
            try:
                for m, (x, y) in enumerate(micro_batches):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with distributed.no_sync(trained, sync=m == len(micro_batches) - 1):
                        with autocast:
                            _, loss = forward(x, y, reduction="sum")  # float32 sum over scored targets
                        loss = loss / max(1, tokens)
                        # DDP and FSDP average gradients over ranks: scale back up to a sum over all tokens
                        scaler.scale(loss * context.world_size).backward()
                    loss_sum += loss.detach()
                scaler.unscale_(optimizer)
                clip = config.grad_clip if config.grad_clip > 0 else float("inf")
                grad_norm = distributed.grad_norm(torch.nn.utils.clip_grad_norm_(trained.parameters(), clip))
                scaler.step(optimizer)  # fp16: skips the step if the gradients overflowed
                scaler.update()
            except RuntimeError as error:
                if not _out_of_memory(error):
                    raise
                raise ConfigError(
                    _out_of_memory_advice(stage, device, step, config, x.shape, precision)
                ) from error
            optimizer.zero_grad(set_to_none=True)
            finite = torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | skip_bad_grad)
            first_bad = torch.where(finite | (first_bad >= 0), first_bad, step)
            window_tokens, window_steps = window_tokens + seen, window_steps + 1
            done = step + 1

            logs = done % config.log_interval == 0 or done == total_steps
            evaluates = done % config.eval_interval == 0 or done == total_steps
            checkpoints = done % config.checkpoint_interval == 0 or done == total_steps
            if logs or evaluates or checkpoints:
                loss_value = float(distributed.total(context, loss_sum))
                grad_value, bad_step = float(grad_norm), int(first_bad)
                if bad_step >= 0:
                    kept = latest_checkpoint(checkpoint_dir)
                    raise TrainingDiverged(
                        f"{stage}: loss or gradient norm became non-finite at step {bad_step} "
                        f"(at step {step}: loss {loss_value}, grad norm {grad_value}); last good checkpoint: "
                        f"{kept or 'none'}: start a new run with a lower --learning-rate or more "
                        "--warmup-steps"
                    )

            if logs:
                now = time.perf_counter()
                window_seconds += now - segment_started
                segment_started = now
                metrics.update(
                    loss=loss_value,
                    lr=lr,
                    grad_norm=grad_value,
                    tokens_per_second=window_tokens / window_seconds,
                )
                if scaler.is_enabled():
                    metrics["grad_scale"] = scaler.get_scale()
                if peak:
                    metrics["mfu"] = model.flops_per_token() * metrics["tokens_per_second"] / peak
                step_ms = 1000 * window_seconds / window_steps
                window_tokens, window_steps, window_seconds = 0, 0, 0.0
                tracker.log_metrics(
                    {f"{stage}/{k}": v for k, v in metrics.items() if not k.startswith("val_")}, step=done
                )
                eta = (now - started) / (done - start_step) * (total_steps - done)
                log.info(
                    "%s step %d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s | %.0f ms/step%s | %s left",
                    stage,
                    done,
                    total_steps,
                    loss_value,
                    lr,
                    grad_value,
                    metrics["tokens_per_second"],
                    step_ms,
                    f" | MFU {metrics['mfu']:.1%}" if peak else "",
                    _duration(eta),
                )

            if evaluates or checkpoints:
                _synchronize(device)
                window_seconds += time.perf_counter() - segment_started

            if evaluates:
                val = distributed.shared_scores(  # on many processes each rank scores its share
                    context, trained, val_batches, lambda m, b: token_loss(m, b, device, token_bytes), device
                )
                metrics.update({f"val_{k}": v for k, v in val.items() if k in ("loss", "bpb")})
                tracker.log_metrics(
                    {f"{stage}/val_{k}": v for k, v in val.items() if k in ("loss", "bpb")}, step=done
                )
                log.info(
                    "%s step %d/%d | val loss %.4f%s",
                    stage,
                    done,
                    total_steps,
                    val["loss"],
                    f" | val bpb {val['bpb']:.4f}" if "bpb" in val else "",
                )

            if checkpoints:
                rng = {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                }
                position = {"step": done, "batch_index": done * config.grad_accum_steps}  # the data position
                model_state, optimizer_state = distributed.full_state(trained, optimizer)
                state = {
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "scaler": scaler.state_dict(),
                    "rng": rng,
                    **position,
                    "metrics": metrics,
                    "identity": identity,
                    "train_config": asdict(config),
                }
                if context.is_main:
                    save_checkpoint(
                        checkpoint_dir,
                        done,
                        state,
                        {"stage": stage, "metrics": metrics, "identity": identity},
                        keep=config.keep_checkpoints,
                    )

            if evaluates or checkpoints:
                segment_started = time.perf_counter()
    finally:
        batches.close()
    distributed.finish(trained, model)
    metrics.update(steps=total_steps, wall_seconds=time.perf_counter() - started)
    return metrics


def _out_of_memory_advice(
    stage: str, device: torch.device, step: int, config: TrainConfig, shape: torch.Size, precision: str
) -> str:
    """The one line that says a step ran out of memory and what to lower."""
    lower = [
        f"lower --batch-size (now {config.batch_size}; raise --grad-accum-steps, now "
        f"{config.grad_accum_steps}, to keep the tokens per step)",
        f"the context (now {shape[-1]} tokens: --block-size, or --max-length when fine-tuning)",
    ]
    if not config.activation_checkpointing:
        lower.append("pass --activation-checkpointing")
    return (
        f"{stage}: out of memory on {device} at step {step + 1} (micro-batch {shape[0]} x {shape[-1]} "
        f"tokens, {precision}): {', or '.join(lower)}"
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@locks_folder("out_dir")
def pretrain(
    tokenizer_dir: Path,
    tokens_dir: Path,
    model_config: GPTConfig,
    config: TrainConfig,
    out_dir: Path,
    tracker: Tracker = NullTracker(),
) -> dict[str, Any]:
    """Pretrain a GPT on the token shards; write out_dir/model.pt and out_dir/manifest.json when done.

    Checkpoints go to out_dir/checkpoints; a rerun with the same out_dir resumes there, and a finished
    out_dir (manifest present) is returned as is.
    """
    out_dir = Path(out_dir)
    block = model_config.block_size
    tracker.log_params(
        {
            "model": asdict(model_config),
            "pretrain": asdict(config) | {"total_steps": config.total_steps(block)},
        }
    )
    tokens = read_json(Path(tokens_dir) / MANIFEST) if is_finished(Path(tokens_dir)) else {}
    inputs = {
        "corpus_digest": tokens.get("corpus_digest"),
        "tokenizer_digest": tokens.get("tokenizer_digest"),
    }
    if is_finished(out_dir):
        manifest = read_json(out_dir / MANIFEST)
        require_same_run(out_dir, manifest["identity"], run_identity(model_config, config, inputs))
        verify_model(out_dir / "model.pt")
        log.info("pretrain: %s is finished, reusing it", out_dir)
        return manifest
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ConfigError(
            f"model vocab_size {model_config.vocab_size} != tokenizer's {tokenizer.vocab_size}: "
            "pass --vocab-size equal to the tokenizer's"
        )
    train_batches = token_windows(
        open_split(tokens_dir, "train"), block, config.batch_size, config.seed, "train", config.shift_windows
    )
    val_batches = token_windows(
        open_split(tokens_dir, "validation"), block, config.batch_size, config.seed, "validation"
    ).in_order(config.eval_batches)
    torch.manual_seed(config.seed)
    model = GPT(model_config)
    log.info(
        "pretrain: %s parameters, %d steps of %d tokens on %s",
        f"{model.num_params():,}",
        config.total_steps(block),
        config.batch_size * config.grad_accum_steps * block,
        resolve_device(config.device),
    )
    tracker.log_metrics({"pretrain/num_params": model.num_params()})
    metrics = fit(
        model,
        train_batches,
        val_batches,
        config,
        out_dir / "checkpoints",
        inputs=inputs,
        token_bytes=torch.from_numpy(tokenizer.token_byte_lengths()),
        tracker=tracker,
        stage="pretrain",
    )
    if distributed.env_rank() != 0:  # under torchrun rank 0 writes the model and manifest for the job
        return {"stage": "pretrain", "metrics": metrics}
    model_sha256 = save_model(out_dir / "model.pt", model.to("cpu"))
    manifest = {
        "stage": "pretrain",
        "model": "model.pt",
        "model_sha256": model_sha256,
        "model_config": asdict(model_config),
        "train_config": asdict(config),
        "num_params": model.num_params(),
        "metrics": metrics,
        "identity": run_identity(model_config, config, inputs),
        "torch_version": torch.__version__,
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "tokens_dir": str(Path(tokens_dir).resolve()),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Pretrain a GPT on token shards (resumes from out/checkpoints)."
    )
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="folder written by llmcore.tokenizer train"
    )
    parser.add_argument(
        "--tokens", type=Path, required=True, help="folder written by llmcore.tokenizer encode"
    )
    parser.add_argument("--out", type=Path, required=True)
    add_config_flags(parser, GPTConfig, skip=("vocab_size",))
    add_config_flags(parser, TrainConfig)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=distributed.log_level(), format="%(asctime)s %(message)s")
    model_args = given(GPTConfig, args)
    train_args = given(TrainConfig, args)
    try:
        tokenizer = Tokenizer.load(args["tokenizer"])
        with env_tracker() as tracker:
            manifest = pretrain(
                args["tokenizer"],
                args["tokens"],
                GPTConfig(vocab_size=tokenizer.vocab_size, **model_args),
                replace(TrainConfig(), **train_args),
                args["out"],
                tracker,
            )
    except ConfigError as error:
        parser.error(str(error))
    finally:
        distributed.close()
    if distributed.env_rank() == 0:
        print({k: round(v, 4) for k, v in manifest["metrics"].items()})


if __name__ == "__main__":
    main()
