"""The losses: the training loss without the full logits, and the scores every stage reports.

`linear_cross_entropy` is the training loss: the output projection and cross-entropy taken together, a
chunk of positions at a time, so that no (tokens, vocab) tensor, let alone a float32 copy of one, is ever
held (6.6 GB per micro-batch at the gpu preset). Training's validation passes (`token_loss`) and
evaluation (`token_loss`, or `position_losses` into `LossSums` to score one pass two ways) share the
forward pass and the sums, so a figure in a training log and the same figure in an evaluation are
computed the same way. This module does not load models or data.
"""

import math
from collections.abc import Iterable, Iterator

import torch

from llmcore.device import resolve_precision

LN2 = math.log(2)
IGNORE = -100  # target of a position that is not scored (llmcore.chat.IGNORE)
LOGITS_PER_CHUNK = 2**25  # logits (rows x vocab) per chunk: 128 MiB in float32


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight.T, one chunk of rows at a time; the gradients are computed
    in the forward pass, while a chunk's logits exist, and only scaled in the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, rows):  # hidden (N, C), weight (V, C), targets (N,)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here
            for start in range(0, hidden.size(0), rows):
                h, y = hidden[start : start + rows].to(dtype), targets[start : start + rows]
                logits = (h @ w.t()).float()  # (rows, V): the only logits that exist at any time
                scored = y != IGNORE
                safe = torch.where(scored, y, 0)
                target = logits.gather(1, safe[:, None]).squeeze(1)
                # log Z = log sum exp(logits), with exp taken once, in place, on the logits less their
                # maximum (torch.logsumexp would take it into a new tensor, and the gradient again)
                peak = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(peak).exp_()
                norm = exps.sum(dim=-1)
                total += ((norm.log() + peak.squeeze(1) - target) * scored).sum()
                if need_hidden or need_weight:
                    # d(loss)/d(logits) = softmax - one_hot(target), zero on unscored rows
                    grad = exps.div_(norm[:, None])
                    grad[torch.arange(len(y), device=y.device), safe] -= 1
                    grad = grad.mul_(scored[:, None]).to(dtype)
                    if need_hidden:
                        grad_hidden[start : start + rows] = grad @ w
                    if need_weight:
                        grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_total,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """Sum over scored targets (not IGNORE) of cross_entropy(hidden @ weight.T, targets), in float32.

    hidden (..., C), weight (V, C), targets (...). Equal to `F.cross_entropy(F.linear(hidden, weight)
    .float(), targets, reduction="sum")` up to float rounding, gradients included, but the logits are made
    `rows` positions at a time (default: LOGITS_PER_CHUNK // V): memory holds one chunk's logits, and
    float32 only per chunk, under autocast too, whose dtype the matmuls use.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = rows or max(1, LOGITS_PER_CHUNK // weight.size(0))
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), dtype, rows
    )


class LossSums:
    """Running sums of a per-position loss over batches: the loss and count of scored targets (not IGNORE)
    and, given the byte length of every token id, the bits and bytes of those standing for bytes (targets
    like end-of-text stand for none, so their loss has no byte to charge it to and is left out of both)."""

    def __init__(self, token_bytes: torch.Tensor | None = None) -> None:
        self.token_bytes = token_bytes
        self.loss, self.tokens, self.bits, self.bytes = 0.0, 0, 0.0, 0

    def add(self, losses: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch's losses (B, T) at its scored targets y (B, T); losses elsewhere are not read."""
        valid = y != IGNORE
        self.loss += float(losses[valid].float().sum())
        self.tokens += int(valid.sum())
        if self.token_bytes is not None:
            nbytes = self.token_bytes.to(y.device)[y.clamp(min=0)] * valid
            self.bits += float((losses.float() * (nbytes > 0)).sum()) / LN2
            self.bytes += int(nbytes.sum())

    def result(self) -> dict[str, float]:
        """`loss` (mean per scored target) and `tokens`, and `bpb` and `bytes` when bytes were counted."""
        result = {"loss": self.loss / max(1, self.tokens), "tokens": float(self.tokens)}
        if self.bytes:
            result.update(bpb=self.bits / self.bytes, bytes=float(self.bytes))
        return result


@torch.no_grad()
def position_losses(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's (losses, targets) on `device`, losses per position and 0 where the target is IGNORE.
    The model runs in eval mode, in the device's `auto` precision (`llmcore.device.resolve_precision`:
    fp32 on CPU, bf16 or fp16 autocast on CUDA), whatever a run trained in, so that runs score alike."""
    was_training = model.training
    model.eval()
    dtype = resolve_precision("auto", device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast:
                _, losses = model(x, y, reduction="none")  # (B, T)
            yield losses, y
    finally:
        model.train(was_training)


def token_loss(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    token_bytes: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean loss per scored target token (`LossSums`), and bits per byte when the byte length of every
    token id is given, with the forward pass of `position_losses`."""
    sums = LossSums(token_bytes)
    for losses, y in position_losses(model, batches, device):
        sums.add(losses, y)
    return sums.result()
