"""Supervised instruction fine-tuning: prompt/response pairs in, a fine-tuned model out.

A pair becomes one chat turn (`llmcore.chat`); the loss is taken on the response and its `<|end|>` only.
Training reuses `llmcore.train.fit`, starting from the pretrained weights, and resumes like pretraining.
All weights train, or only low-rank adapters (`llmcore.adapters`): then the adapter is saved on its own
(`adapter/`) and merged into the saved `model.pt`, which later stages load as any model.
Building the pairs is `llmcore.sft_data`'s job; this module only encodes and trains on them.

    python -m llmcore.finetune --base DIR/model.pt --tokenizer DIR --sft DIR --out DIR --max-steps 100
"""

import argparse
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from llmcore import distributed
from llmcore.adapters import AdapterConfig, apply_lora, merge, parameter_counts, save_adapter
from llmcore.artifacts import MANIFEST, atomic_write_json, file_digest, is_finished, locks_folder, read_json
from llmcore.batches import sft_batches
from llmcore.checkpoint import load_model, save_model, verify_model
from llmcore.cli import add_config_flags, given
from llmcore.errors import ConfigError
from llmcore.tokenizer import Tokenizer
from llmcore.tracking import NullTracker, Tracker, env_tracker
from llmcore.train import TrainConfig, fit, require_same_run, run_identity

log = logging.getLogger(__name__)


@locks_folder("out_dir")
def finetune(
    base_model: Path,
    tokenizer_dir: Path,
    sft_dir: Path,
    config: TrainConfig,
    out_dir: Path,
    max_length: int | None = None,
    tracker: Tracker = NullTracker(),
    adapter: AdapterConfig = AdapterConfig(),
) -> dict[str, Any]:
    """Fine-tune the model in base_model on the pairs in sft_dir; write out_dir/model.pt and manifest.json.

    max_length (the longest training sequence) defaults to the model's context length and may not exceed it.
    """
    out_dir = Path(out_dir)
    model = load_model(base_model)
    block = model.config.block_size
    if max_length is not None and not (0 < max_length <= block):
        raise ConfigError(
            f"context length {max_length} does not fit the model, which supports 1..{block}: "
            f"pass --max-length <= {block}"
        )
    max_length = max_length or block
    tracker.log_params(
        {
            "finetune": asdict(config) | {"max_length": max_length, "base_model": str(base_model)},
            "adapter": asdict(adapter),
        }
    )
    inputs = {
        "base_model": file_digest(Path(base_model)),
        "sft_data": read_json(Path(sft_dir) / MANIFEST)["content_digest"]
        if is_finished(Path(sft_dir))
        else None,
        "max_length": max_length,
        "adapter": asdict(adapter),
    }
    if is_finished(out_dir):
        manifest = read_json(out_dir / MANIFEST)
        require_same_run(out_dir, manifest["identity"], run_identity(model.config, config, inputs))
        verify_model(out_dir / "model.pt")
        log.info("finetune: %s is finished, reusing it", out_dir)
        return manifest
    tokenizer = Tokenizer.load(tokenizer_dir)
    train_batches = sft_batches(
        sft_dir, "train", tokenizer, max_length, config.batch_size, config.seed, config.group_by_length
    )
    val_batches = sft_batches(sft_dir, "validation", tokenizer, max_length, config.batch_size, config.seed)
    log.info(
        "finetune: %d train / %d validation pairs, %d steps; %d train pairs cut to %d tokens (end kept), "
        "%.0f%% of positions train%s",
        train_batches.num_rows,
        val_batches.num_rows,
        config.total_steps(max_length),
        train_batches.info["rows_cut"],
        max_length,
        100 * train_batches.info["trained_fraction"],
        "; batches of pairs of like length" if config.group_by_length else "",
    )
    tracker.log_metrics(
        {
            "finetune/train_pairs": train_batches.num_rows,
            "finetune/validation_pairs": val_batches.num_rows,
            "finetune/train_pairs_cut": train_batches.info["rows_cut"],
            "finetune/trained_fraction": train_batches.info["trained_fraction"],
        }
    )
    if adapter.finetune_method == "lora":
        model = apply_lora(model, adapter)
    counts = parameter_counts(model)
    log.info(
        "finetune: %s: %s of %s parameters train",
        adapter.finetune_method,
        *map("{:,}".format, counts.values()),
    )
    model.train()
    metrics = fit(
        model,
        train_batches,
        val_batches.in_order(config.eval_batches),
        config,
        out_dir / "checkpoints",
        tracker=tracker,
        stage="finetune",
        sequence_length=max_length,
        inputs=inputs,
    )
    if distributed.env_rank() != 0:  # under torchrun rank 0 writes the model and manifest for the job
        return {"stage": "finetune", "metrics": metrics}
    if adapter.finetune_method == "lora":
        save_adapter(model, out_dir / "adapter")
        model = merge(model)
    # max_length travels with the weights: sampling, the pyfunc model and evaluation cut prompts with it
    model_sha256 = save_model(
        out_dir / "model.pt", model.to("cpu"), extra={"chat": True, "max_length": max_length}
    )
    manifest = {
        "stage": "finetune",
        "model": "model.pt",
        "model_sha256": model_sha256,
        "base_model": str(Path(base_model).resolve()),
        "model_config": asdict(model.config),
        "train_config": asdict(config),
        "max_length": max_length,
        "metrics": metrics,
        "params": counts,
        "adapter_config": asdict(adapter),
        "adapter": "adapter" if adapter.finetune_method == "lora" else None,
        "identity": run_identity(model.config, config, inputs),
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "sft_dir": str(Path(sft_dir).resolve()),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Instruction fine-tuning from a pretrained model.pt.")
    parser.add_argument("--base", type=Path, required=True, help="model.pt written by pretraining")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--sft", type=Path, required=True, help="folder written by llmcore.sft_data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-length", type=int)
    add_config_flags(parser, TrainConfig)
    add_config_flags(parser, AdapterConfig)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=distributed.log_level(), format="%(asctime)s %(message)s")
    train_args = given(TrainConfig, args)
    try:
        with env_tracker() as tracker:
            manifest = finetune(
                args["base"],
                args["tokenizer"],
                args["sft"],
                replace(TrainConfig(), **train_args),
                args["out"],
                args["max_length"],
                tracker,
                adapter=replace(AdapterConfig(), **given(AdapterConfig, args)),
            )
    except ConfigError as error:
        parser.error(str(error))
    finally:
        distributed.close()
    if distributed.env_rank() == 0:
        print({k: round(v, 4) for k, v in manifest["metrics"].items()})


if __name__ == "__main__":
    main()
