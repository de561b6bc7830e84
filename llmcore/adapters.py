"""Low-rank adapters (LoRA) on our own modules, through `peft`: wrap, count, save on its own, load, merge.

`peft` serves our plain `nn.Module`s (no Hugging Face model class needed): `get_peft_model` replaces the
targeted `nn.Linear` layers by LoRA layers and freezes everything else; modules named in
`modules_to_save` (a classification head) stay fully trainable and travel with the adapter. The wrapped
model is called exactly like the original, so `llmcore.train.fit` trains it unchanged. `merge` folds the
adapter into the weights and returns the original module class, which every later stage loads as usual.

Which fine-tuning method to use is the caller's decision (`AdapterConfig.finetune_method`); this module
neither trains nor knows about tokens. peft is imported only when an adapter is built or loaded.
"""

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from llmcore.artifacts import atomic_output_dir
from llmcore.errors import ConfigError, require_choice, require_non_negative, require_positive
from llmcore.sampling import release_decoding_layout

METHODS = ("full", "lora")


@dataclass(frozen=True)
class AdapterConfig:
    """How fine-tuning changes the weights: all of them (`full`), or low-rank adapters (`lora`)."""

    finetune_method: str = "full"  # full | lora
    lora_rank: int = 8  # rank r of each update B @ A
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapter's input during training
    lora_targets: str = "c_attn,c_proj,c_fc"  # comma-separated module names (suffixes) that get adapters

    def __post_init__(self) -> None:
        require_choice("finetune_method", self.finetune_method, METHODS)
        require_positive("lora_rank", self.lora_rank)
        require_positive("lora_alpha", self.lora_alpha)
        require_non_negative("lora_dropout", self.lora_dropout)
        if self.lora_dropout >= 1:
            raise ConfigError(
                f"lora_dropout must be below 1, got {self.lora_dropout}: pass --lora-dropout in [0, 1)"
            )
        if not self.targets:
            raise ConfigError("lora_targets names no module: pass --lora-targets such as c_attn,c_proj,c_fc")

    @property
    def targets(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a target given by name: the module's full name or its last dotted parts."""
    return module_name == target or module_name.endswith("." + target)


def require_targets(model: nn.Module, targets: list[str]) -> None:
    """ConfigError naming the first target that matches no linear layer (peft fails only if none match)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for target in targets:
        if not any(_matches(name, target) for name in linear):
            choices = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(
                f"LoRA target {target!r} matches no linear layer of {type(model).__name__}: pass "
                f"--lora-targets naming some of {', '.join(choices)}"
            )


def apply_lora(model: nn.Module, config: AdapterConfig, modules_to_save: tuple[str, ...] = ()) -> nn.Module:
    """`model` with LoRA adapters on `config.targets` (a peft `PeftModel`); only the adapters and the
    `modules_to_save` train. The base weights are shared with `model`, not copied."""
    from peft import LoraConfig, get_peft_model

    require_targets(model, config.targets)
    release_decoding_layout(model)  # peft merges through `weight.data`, which a kept layer would not see
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.targets,
        modules_to_save=list(modules_to_save) or None,
    )
    return get_peft_model(model, lora)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters, each tensor once; peft's frozen copy of a `modules_to_save` module
    (`original_module`) is not counted, as it is not part of the merged model."""
    seen, trainable, total = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or ".original_module." in name:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total}


def save_adapter(model: nn.Module, folder: Path) -> None:
    """The adapter weights and their peft config alone (no base weights), written atomically."""
    with atomic_output_dir(Path(folder)) as tmp:
        model.save_pretrained(str(tmp))


def load_adapter(base: nn.Module, folder: Path) -> nn.Module:
    """`base` with the adapter saved in `folder` (unmerged, for inference)."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(
            f"{folder} holds no adapter (no adapter_config.json): pass a folder written by save_adapter"
        )
    release_decoding_layout(base)  # as in apply_lora
    return PeftModel.from_pretrained(base, str(folder)).eval()


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights; returns the original module class without peft layers."""
    return model.merge_and_unload()
