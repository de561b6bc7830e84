"""Full fine-tuning against LoRA on a classification task: held-out quality and wall time, one table.

Both methods start from the same pretrained model, read the same texts (the default source-group task of
a corpus, or a labelled file) and train with the same recipe; the majority class and TF-IDF + logistic
regression, scored on the same split, are printed beside them. Prints a markdown table; writes nothing
except each run's folder under --out.

    python -m benchmarks.finetune_methods --base runs/pretrain/<id>/model.pt --tokenizer runs/tokenizer/<id> \
        --corpus runs/corpus/<id> --out /tmp/bench --max-steps 200
"""

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from llmcore.adapters import AdapterConfig
from llmcore.classify import DEFAULT_TRAIN, ClassifyConfig, ClassifyDataConfig, load_texts, train_classifier
from llmcore.cli import add_config_flags, given
from llmcore.errors import ConfigError
from llmcore.train import TrainConfig


def compare(
    base: Path,
    tokenizer: Path,
    corpus: Path | None,
    data: ClassifyDataConfig,
    config: ClassifyConfig,
    adapter: AdapterConfig,
    train: TrainConfig,
    out: Path,
) -> list[dict]:
    """One row per method (full, lora), then the two baselines from the full run (the same split)."""
    texts = load_texts(data, corpus)
    rows, metrics = [], {}
    for method in ("full", "lora"):
        started = time.perf_counter()
        manifest = train_classifier(
            base, tokenizer, texts, config, replace(adapter, finetune_method=method), train, out / method
        )
        metrics = manifest["metrics"]
        rows.append(
            {
                "method": method,
                "trainable_params": metrics["finetune/trainable_params"],
                "accuracy": metrics["classifier_accuracy"],
                "macro_f1": metrics["classifier_macro_f1"],
                "seconds": time.perf_counter() - started,
            }
        )
    for name in ("tfidf", "majority"):
        rows.append(
            {
                "method": name,
                "trainable_params": None,
                "accuracy": metrics[f"{name}_accuracy"],
                "macro_f1": metrics[f"{name}_macro_f1"],
                "seconds": None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.finetune_methods", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--base", type=Path, required=True, help="model.pt written by pretraining")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, help="corpus folder (the default source-group task)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the two runs (reused when finished)"
    )
    configs = (ClassifyDataConfig, ClassifyConfig, AdapterConfig, TrainConfig)
    for config_class in configs:
        add_config_flags(parser, config_class, skip=("finetune_method",))
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        built = [replace(DEFAULT_TRAIN if c is TrainConfig else c(), **given(c, args)) for c in configs]
        rows = compare(args["base"], args["tokenizer"], args["corpus"], *built, args["out"])
    except ConfigError as error:
        parser.error(str(error))
    print("\n| method | trainable params | accuracy | macro-F1 | wall s |\n|---|---:|---:|---:|---:|")
    for row in rows:
        params = f"{row['trainable_params']:,}" if row["trainable_params"] is not None else "-"
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        print(f"| {row['method']} | {params} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {seconds} |")


if __name__ == "__main__":
    main()
