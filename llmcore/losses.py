"""The loss every stage scores batches with: mean loss per target token, and bits per byte.

Training (validation passes) and evaluation both call `token_loss`, so a figure in a training log and the
same figure in an evaluation are computed the same way. This module does not load models or data.
"""

import math
from collections.abc import Sequence

import torch

LN2 = math.log(2)


@torch.no_grad()
def token_loss(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    token_bytes: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean loss per scored target token (targets of -100 are ignored), and bits per byte when the
    byte length of every token id is given (targets standing for zero bytes, like end-of-text, are left
    out of both sums, as their loss has no byte to charge it to)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, bits_sum, byte_sum = 0.0, 0, 0.0, 0
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            _, losses = model(x, y, reduction="none")  # (B, T), 0 where ignored
        valid = y != -100
        loss_sum += float(losses[valid].float().sum())
        tokens += int(valid.sum())
        if token_bytes is not None:
            nbytes = token_bytes.to(device)[y.clamp(min=0)] * valid
            bits_sum += float((losses.float() * (nbytes > 0)).sum()) / LN2
            byte_sum += int(nbytes.sum())
    model.train(was_training)
    result = {"loss": loss_sum / max(1, tokens), "tokens": float(tokens)}
    if token_bytes is not None and byte_sum:
        result.update(bpb=bits_sum / byte_sum, bytes=float(byte_sum))
    return result
