"""Recipe ablations: held-out bits per byte of a preset's pretraining with one recipe change at a time.

Every variant trains the preset's model from the same seed on the same token shards for the same number
of steps and is scored on the same held-out windows (the preset's validation batches); the table gives
steps, wall seconds and final validation bits per byte. A change earns a place in the defaults only if it
lowers bits per byte at equal wall time. Variants run one after the other in this process, so on a shared
machine their wall times are comparable only as far as the load stayed put: the load average is printed.

    python -m benchmarks.ablations --tokenizer DIR --tokens DIR --preset smoke --max-steps 400 \\
        --variants baseline,wsd,muon,qk_norm
"""

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from llmcore.presets import get_preset
from llmcore.train import pretrain

# Each variant: (model config changes, pretraining config changes) on top of the preset with the recipe
# every change is measured against: AdamW and a cosine schedule, whatever the preset's own recipe is.
BASELINE = {"optimizer": "adamw", "lr_schedule": "cosine"}
VARIANTS: dict[str, tuple[dict, dict]] = {
    "baseline": ({}, BASELINE),
    "wsd": ({}, BASELINE | {"lr_schedule": "wsd"}),
    "muon": ({}, BASELINE | {"optimizer": "muon"}),
    "muon+wsd": ({}, {"optimizer": "muon", "lr_schedule": "wsd"}),
    "qk_norm": ({"qk_norm": True}, BASELINE),
    "muon+wsd+qk_norm": ({"qk_norm": True}, {"optimizer": "muon", "lr_schedule": "wsd"}),
    "lr x2": ({}, BASELINE | {"learning_rate_scale": 2.0}),
    "muon+wsd lr x2": ({}, {"optimizer": "muon", "lr_schedule": "wsd", "learning_rate_scale": 2.0}),
    "batch x2": ({}, BASELINE | {"batch_size_scale": 2}),
    # bf16 autocast on a CPU with bf16 arithmetic (AVX512-BF16, AMX): faster steps, so more of them in the
    # same wall time; the step count is scaled by the measured speed-up so that wall times match.
    "muon+wsd bf16": ({}, {"optimizer": "muon", "lr_schedule": "wsd", "precision": "bf16"}),
    "muon+wsd bf16 x1.24 steps": (
        {},
        {"optimizer": "muon", "lr_schedule": "wsd", "precision": "bf16", "steps_scale": 1.24},
    ),
    # the recipe at twice the learning rate in fp32, whatever precision the preset picks on this machine
    "muon+wsd fp32 lr x2": (
        {},
        {"optimizer": "muon", "lr_schedule": "wsd", "precision": "fp32", "learning_rate_scale": 2.0},
    ),
    "muon+wsd bf16 x1.24 steps lr x2": (
        {},
        {
            "optimizer": "muon",
            "lr_schedule": "wsd",
            "precision": "bf16",
            "steps_scale": 1.24,
            "learning_rate_scale": 2.0,
        },
    ),
    # changes on top of the preset's own recipe, whatever it is on this machine
    "preset": ({}, {}),
    # the steps of the changes that make a step slower are scaled by the measured slow-down (README)
    "preset dropout 0.1 x0.9 steps": ({"dropout": 0.1}, {"steps_scale": 0.9}),
    "preset shift": ({}, {"shift_windows": True}),
    # A context variant names its rows (block_size x batch_size = 4,096 tokens a step, the preset's), so it
    # means the same whatever context the preset has moved to since it was measured (README).
    "preset context 512 x0.87 steps": ({"block_size": 512}, {"batch_size": 8, "steps_scale": 0.87}),
    "preset context 512 shift x0.87 steps": (
        {"block_size": 512},
        {"batch_size": 8, "steps_scale": 0.87, "shift_windows": True},
    ),
    "preset context 1024 x0.93 steps": ({"block_size": 1024}, {"batch_size": 4, "steps_scale": 0.93}),
    "preset context 1024 lr x1.5 x0.93 steps": (
        {"block_size": 1024},
        {"batch_size": 4, "steps_scale": 0.93, "learning_rate_scale": 1.5},
    ),
    "preset context 2048 x0.77 steps": (
        {"block_size": 2048},
        {"batch_size": 2, "steps_scale": 0.77},
    ),
    "preset context 1024 qk_norm x0.89 steps": (
        {"block_size": 1024, "qk_norm": True},
        {"batch_size": 4, "steps_scale": 0.89},
    ),
    "preset lr x1.5": ({}, {"learning_rate_scale": 1.5}),
    "preset lr x2": ({}, {"learning_rate_scale": 2.0}),
    "preset cooldown 0.4 to 0": ({}, {"cooldown_fraction": 0.4, "min_lr_ratio": 0.0}),
    "preset context 2048 x0.85 steps": ({"block_size": 2048}, {"batch_size": 2, "steps_scale": 0.85}),
    # the preset as a CPU without bf16 arithmetic runs it (pass that run's steps as --max-steps)
    "preset fp32": ({}, {"precision": "fp32"}),
}


def run(
    tokenizer: Path, tokens: Path, preset_name: str, max_steps: int, variants: list[str], out: Path
) -> list[dict]:
    preset = get_preset(preset_name)
    rows = []
    for name in variants:
        model_changes, train_changes = VARIANTS[name]
        train_changes = dict(train_changes)
        lr = preset.pretrain.learning_rate * train_changes.pop("learning_rate_scale", 1.0)
        scale = train_changes.pop("batch_size_scale", 1)
        batch = train_changes.pop("batch_size", round(preset.pretrain.batch_size * scale))
        steps = round(max_steps * train_changes.pop("steps_scale", 1.0))
        config = replace(
            preset.pretrain,
            max_steps=steps,
            learning_rate=lr,
            batch_size=batch,
            eval_interval=steps,
            checkpoint_interval=steps,
            **train_changes,
        )
        model = replace(preset.model, **model_changes)
        load = os.getloadavg()[0]
        manifest = pretrain(tokenizer, tokens, model, config, out / name.replace(" ", "_").replace("+", "_"))
        metrics = manifest["metrics"]
        rows.append(
            {
                "variant": name,
                "steps": steps,
                "batch": batch,
                "lr": lr,
                "wall_s": round(metrics["wall_seconds"], 1),
                "val_bpb": round(metrics["val_bpb"], 4),
                "load": f"{load:.1f}-{os.getloadavg()[0]:.1f}",
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablations", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument(
        "--variants", default="baseline,wsd,muon,muon+wsd,qk_norm", help=f"of {list(VARIANTS)}"
    )
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary one)")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in names if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}: pass --variants from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.tokenizer, args.tokens, args.preset, args.max_steps, names, args.out or Path(tmp))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
