"""The optimizers `fit` trains with: fused AdamW for everything, or Muon for the blocks' matrices.

- `adamw` (default): torch's fused AdamW, weight decay on matrices only.
- `muon`: torch's `Muon` (momentum, then the update of each 2-D matrix replaced by its nearest
  orthogonal matrix through a Newton-Schulz iteration, as in modded-nanogpt and nanochat) for the
  transformer blocks' weight matrices, and AdamW for what Muon is not meant for: the token embedding,
  the output projection (tied or not), norms and any head a caller adds. Muon's step size is matched to
  AdamW's update RMS (Moonshot's `match_rms_adamw`), so both share the config's learning rate and schedule.

Both are one `torch.optim.Optimizer`-like object for the loop: `param_groups` (to set the learning rate),
`step`, `zero_grad`, `state_dict` and `load_state_dict`. This module does not schedule the learning rate
(llmcore.train does) and does not know about distributed training.
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "muon")


class Combined:
    """Several optimizers over disjoint parameters, stepped together as one."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _adamw(
    params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=True,  # CPU too: 5x foreach
    )


def build_optimizer(
    model: nn.Module, kind: str, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer | Combined:
    """The optimizer of `kind` ("adamw" or "muon") over `model`'s parameters (frozen ones get no gradient,
    so no update).

    Muon takes the 2-D weights inside the transformer blocks (any module path through `blocks.`, so a
    GPT wrapped by a classifier or adapters too); everything else, embeddings and heads included, stays
    with AdamW.
    """
    if kind == "adamw":
        return _adamw(model.parameters(), lr, betas, weight_decay)
    in_blocks = [p for name, p in model.named_parameters() if p.dim() == 2 and ".blocks." in f".{name}"]
    muon_ids = {id(p) for p in in_blocks}
    rest = [p for p in model.parameters() if id(p) not in muon_ids]
    optimizers: dict[str, torch.optim.Optimizer] = {"adamw": _adamw(rest, lr, betas, weight_decay)}
    if in_blocks:
        optimizers["muon"] = torch.optim.Muon(
            in_blocks, lr=lr, weight_decay=weight_decay, momentum=0.95, adjust_lr_fn="match_rms_adamw"
        )
    return Combined(optimizers)
