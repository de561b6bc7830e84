"""Classification fine-tuning as a Prefect flow: train and score a classifier from a pretrained model.

`python -m flows.pipeline` runs it as its classification fine-tuning step (`--finetune-kind`); here it
runs on its own, on the outputs of a pipeline run. One MLflow run (a child of the pipeline's run when
`parent_run_id` is given) gets the parameters, step and held-out metrics (`classifier_*`, `majority_*`,
`tfidf_*`, `finetune/trainable_params`, ...), the confusion matrix, the per-class table, the adapter
(LoRA) and the pyfunc classifier. Without labelled data (`--classify-data corpus`, the default) the task
is which source group of the corpus each passage comes from.

    python -m flows.classify --base-model runs/pretrain/<id>/model.pt --tokenizer-dir runs/tokenizer/<id> \
        --corpus-dir runs/corpus/<id> --finetune-method lora --max-steps 200
    python -m flows.classify --help
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.cli import add_debug_flag, add_flow_arguments, flow_arguments, run_command
from flows.stages import EXPERIMENT, RUNS_DIR, _tags, stage_run_name
from llmcore.adapters import AdapterConfig
from llmcore.classify import DEFAULT_TRAIN, ClassifyConfig, ClassifyDataConfig, load_texts
from llmcore.errors import ConfigError
from llmcore.tokenizer import Tokenizer
from llmcore.train import TrainConfig
from tasks import classify
from tasks.tracking import configure_tracking, mlflow_run


@flow(name="classification", flow_run_name=stage_run_name)
def classify_flow(
    base_model: str,
    tokenizer_dir: str,
    corpus_dir: str | None = None,
    data: ClassifyDataConfig = ClassifyDataConfig(),
    config: ClassifyConfig = ClassifyConfig(),
    adapter: AdapterConfig = AdapterConfig(),
    train: TrainConfig = DEFAULT_TRAIN,
    runs_dir: str = RUNS_DIR,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    run_label: str | None = None,
) -> dict[str, Any]:
    """Fine-tune a classifier (full, frozen trunk or LoRA); score it beside the majority and TF-IDF.
    Returns its folder (`classifier_dir`) and held-out report (`metrics`)."""
    configure_tracking()  # before the first MlflowClient, which would otherwise pick MLflow's default store
    with mlflow_run(experiment, stage_run_name(), parent_run_id, _tags()) as run_id:
        out = classify.train_classifier(
            base_model, tokenizer_dir, corpus_dir, data, config, adapter, train, runs_dir, run_id
        )
        classify.log_classifier(out, run_id)
        classify.log_classifier_model(run_id, str(Path(out) / "model.pt"), tokenizer_dir)
        return {"classifier_dir": out, "metrics": classify.log_classifier_evaluation(out, run_id)}


def check_inputs(
    base_model: str, tokenizer_dir: str, corpus_dir: str | None, data: ClassifyDataConfig
) -> None:
    """Bad input as one line before Prefect and MLflow start: missing files, columns, labels or groups."""
    if not Path(base_model).is_file():
        raise ConfigError(
            f"model file {base_model} does not exist: pass --base-model with a model.pt from pretraining"
        )
    Tokenizer.load(Path(tokenizer_dir))
    load_texts(data, Path(corpus_dir) if corpus_dir else None)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.classify", description=classify_flow.fn.__doc__)
    add_flow_arguments(parser, classify_flow.fn)
    add_debug_flag(parser)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")

    def run() -> None:
        kwargs = flow_arguments(classify_flow.fn, args)
        check_inputs(kwargs["base_model"], kwargs["tokenizer_dir"], kwargs.get("corpus_dir"), kwargs["data"])
        result = classify_flow(**kwargs)
        print(json.dumps({k: round(v, 4) for k, v in result["metrics"].items()}, indent=2))
        print(f"classifier: {result['classifier_dir']}/model.pt")

    run_command(run, args.get("runs_dir") or RUNS_DIR, debug)


if __name__ == "__main__":
    main(sys.argv[1:])
