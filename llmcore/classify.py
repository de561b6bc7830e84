"""Classification fine-tuning: a label head on the pretrained trunk, trained with cross-entropy over labels.

- Data (`load_texts`): a jsonl/csv/parquet file or `hf:NAME` with a text and a label column, split by a
  hash of each text; or, with no labelled data, the default task on any multi-file corpus: which source
  group (top-level folder or file) a passage comes from. Passages are chunks of whole lines of each
  document; the most frequent groups are the classes and the rest is `other`. That task is split by the
  corpus's own train/validation documents, so nothing of a held-out file is trained on.
- Model (`SequenceClassifier`): the GPT trunk's final (normed) hidden state at the last real token of each
  row, then a linear head. Rows are right-padded with `PAD`; causal attention means real positions never
  see padding, and pooling picks the last real position, so padding changes nothing.
- Training reuses `llmcore.train.fit` (same schedule, clipping, checkpoints and resume); the trunk is
  trained (`full`), frozen, or adapted with LoRA (`llmcore.adapters`). Label names and ids are saved with
  the model.
- Held-out report: accuracy, macro-F1, per-class precision/recall/F1, class counts and a confusion-matrix
  PNG, with the majority class and TF-IDF + logistic regression (`llmcore.baselines`) on the same texts.

It does not log to MLflow or build pyfunc models (tasks/classify.py does).

    python -m llmcore.classify --base DIR/model.pt --tokenizer DIR --corpus DIR --out DIR --max-steps 200
"""

import argparse
import hashlib
import io
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.adapters import AdapterConfig, apply_lora, merge, parameter_counts, save_adapter
from llmcore.artifacts import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    file_digest,
    is_finished,
    json_digest,
    read_json,
)
from llmcore.batches import Batches
from llmcore.checkpoint import load_model
from llmcore.cli import add_config_flags, given
from llmcore.corpus import (
    TABLE_SUFFIXES,
    UnreadableFileError,
    is_validation,
    load_hf_table,
    read_documents,
    read_table,
    table_columns,
)
from llmcore.device import resolve_device
from llmcore.errors import ConfigError, require_fraction, require_positive
from llmcore.model import GPT, GPTConfig
from llmcore.tokenizer import Tokenizer
from llmcore.tracking import NullTracker, Tracker
from llmcore.train import TrainConfig, fit, require_same_run, run_identity

log = logging.getLogger(__name__)

PAD = -1  # input id of padding positions (right padding); never embedded
OTHER = "other"  # the default task's class for every source group not among the most frequent
CORPUS = "corpus"  # ClassifyDataConfig.classify_data value for the default task
MIN_PASSAGE_CHARS = 32  # shorter passages (blank runs, a closing bracket) carry no signal
DEFAULT_TRAIN = TrainConfig(
    max_steps=200,
    batch_size=16,
    learning_rate=1e-3,
    warmup_steps=20,
    eval_interval=100,
    eval_batches=8,
    checkpoint_interval=100,
    log_interval=20,
)


@dataclass(frozen=True)
class ClassifyDataConfig:
    """Where labelled texts come from."""

    classify_data: str = (
        CORPUS  # "corpus" (source-group task on the corpus) | jsonl/csv/parquet file | hf:NAME
    )
    # Names carry a classify_ prefix where the pipeline's corpus flags have the same idea (--text-column).
    classify_text_column: str = "text"  # text column of a labelled file or HF dataset
    label_column: str = "label"  # label column of a labelled file or HF dataset
    classify_hf_config: str | None = None  # HF dataset configuration name
    classify_hf_split: str = "train"  # HF split to read (held-out texts are chosen from it by hash)
    validation_fraction: float = 0.2  # labelled data: share of texts held out, chosen by text hash
    max_classes: int = 8  # default task: the most frequent source groups kept as classes; the rest is "other"
    passage_chars: int = 400  # default task: passages are chunks of whole lines up to this many characters

    def __post_init__(self) -> None:
        if not self.classify_data or (
            self.classify_data.startswith("hf:") and not self.classify_data[3:].strip()
        ):
            raise ConfigError(
                "classify_data names nothing: pass --classify-data corpus, a .jsonl/.csv/.parquet "
                "file or hf:NAME"
            )
        require_fraction("validation_fraction", self.validation_fraction)
        require_positive("max_classes", self.max_classes)
        require_positive("passage_chars", self.passage_chars)
        if self.passage_chars < MIN_PASSAGE_CHARS:
            raise ConfigError(
                f"passage_chars {self.passage_chars} is below {MIN_PASSAGE_CHARS}: pass a larger "
                "--passage-chars"
            )


@dataclass(frozen=True)
class ClassifyConfig:
    """How the classifier trains, besides the optimizer recipe (TrainConfig) and method (AdapterConfig)."""

    freeze_trunk: bool = False  # train the head only (a linear probe); full fine-tuning otherwise
    class_weights: bool = False  # weight the loss (and TF-IDF + LR) inversely to class frequency
    max_length: int | None = (
        None  # tokens per text the classifier reads (longer texts are cut); None = context
    )
    eval_batch_size: int = 64  # rows per batch when scoring held-out texts

    def __post_init__(self) -> None:
        if self.max_length is not None:
            require_positive("max_length", self.max_length)
        require_positive("eval_batch_size", self.eval_batch_size)


def require_one_choice_of_weights(config: ClassifyConfig, adapter: AdapterConfig) -> None:
    """ConfigError when both a frozen trunk and LoRA are asked for: each chooses which weights train."""
    if config.freeze_trunk and adapter.finetune_method == "lora":
        raise ConfigError(
            "freeze_trunk and LoRA both choose what trains: pass --finetune-method full with "
            "--freeze-trunk, or LoRA without it"
        )


@dataclass
class LabelledTexts:
    """Texts with integer labels, split; `labels[i]` is the name of label id i."""

    labels: list[str]
    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    description: str

    def digest(self) -> str:
        return json_digest({"labels": self.labels, "train": self.train, "validation": self.validation})


# ---------------------------------------------------------------- data


def source_group(source: str) -> str:
    """The group of a corpus document: the top-level folder or file of its `source` (a table row's
    `#index` and an hf: source's name count as one file)."""
    path = source.split("#", 1)[0]
    return path if path.startswith("hf:") else path.split("/", 1)[0]


def corpus_groups(corpus_dir: Path) -> dict[str, Counter]:
    """Documents per source group, per split of a finished corpus folder."""
    return {
        split: Counter(source_group(doc["source"]) for doc in read_documents(corpus_dir, split))
        for split in ("train", "validation")
    }


def default_classes(groups: dict[str, Counter], max_classes: int) -> list[str]:
    """The default task's classes: the most frequent source groups of the training documents."""
    ranked = sorted(groups["train"], key=lambda g: (-(groups["train"][g] + groups["validation"][g]), g))
    return ranked[:max_classes]


def check_default_task(corpus_dir: Path, max_classes: int = ClassifyDataConfig.max_classes) -> None:
    """ConfigError, in one line, when the corpus cannot give the default task two classes: one source group
    (a single file, a hub dataset) and no labels; or held-out documents that all fall in one class (a flat
    folder of files, each file its own group: every held-out passage would be `other`, and the scores
    would say nothing). Cheap: it reads document sources only."""
    groups = corpus_groups(corpus_dir)
    if len(groups["train"]) < 2:
        names = ", ".join(sorted(groups["train"] | groups["validation"])) or "none"
        raise ConfigError(
            f"corpus {corpus_dir} has one source group ({names}) and no labels, so there is no default "
            "classification task: pass --classify-data with a text and a label column, or a corpus "
            "of several files or folders, or skip classification"
        )
    classes = set(default_classes(groups, max_classes))
    held_out = {group if group in classes else OTHER for group in groups["validation"]}
    if len(held_out) < 2:
        raise ConfigError(
            f"corpus {corpus_dir}: the held-out documents all fall in one class ({', '.join(held_out)}) "
            "of the default classification task (one file per source group?), so it has nothing to "
            "score: pass --classify-data with a text and a label column, or a corpus of folders with "
            "several files each, or skip classification"
        )


def passages(text: str, max_chars: int) -> list[str]:
    """Chunks of whole lines up to max_chars characters (a longer line is cut), shorter ones dropped."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        for piece in (line[i : i + max_chars] for i in range(0, len(line), max_chars)):
            if len(current) + len(piece) > max_chars:
                chunks.append(current)
                current = ""
            current += piece
    chunks.append(current)
    return [c for c in chunks if len(c.strip()) >= MIN_PASSAGE_CHARS]


def source_group_texts(corpus_dir: Path, config: ClassifyDataConfig) -> LabelledTexts:
    """The default task: passages labelled with their document's source group, split like the corpus."""
    check_default_task(corpus_dir, config.max_classes)
    groups = corpus_groups(corpus_dir)
    classes = default_classes(groups, config.max_classes)
    rest = len(groups["train"]) > len(classes) or bool(set(groups["validation"]) - set(classes))
    labels = classes + ([OTHER] if rest and OTHER not in classes else [])
    ids = {name: i for i, name in enumerate(labels)}
    split_texts: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "validation"):
        split_texts[split] = [
            (passage, ids.get(source_group(doc["source"]), ids.get(OTHER, -1)))
            for doc in read_documents(corpus_dir, split)
            for passage in passages(doc["text"], config.passage_chars)
        ]
    return LabelledTexts(
        labels,
        split_texts["train"],
        split_texts["validation"],
        f"source groups of corpus {corpus_dir} ({len(labels)} classes)",
    )


def labelled_file_texts(config: ClassifyDataConfig) -> LabelledTexts:
    """Texts and labels of a labelled file or HF dataset, held out by a hash of each text."""
    source = config.classify_data
    if source.startswith("hf:"):
        frame, where = (
            load_hf_table(source[3:], config.classify_hf_config, config.classify_hf_split),
            f"hf dataset {source[3:]}",
        )
    else:
        path = Path(source)
        if not path.is_file() or path.suffix.lower() not in TABLE_SUFFIXES:
            raise ConfigError(
                f"classification data {source} is not a {'/'.join(TABLE_SUFFIXES)} file: pass "
                "--classify-data corpus, an existing .jsonl/.csv/.parquet file or hf:NAME"
            )
        try:
            frame = read_table(path)
        except UnreadableFileError as e:
            raise ConfigError(
                f"classification data {source} is unreadable ({e}): pass a valid table file"
            ) from e
        where = f"classification data {source}"
    columns = {"classify_text_column": config.classify_text_column, "label_column": config.label_column}
    rows = [
        (text, label.strip())
        for text, label in table_columns(frame, columns, where)
        if text.strip() and label.strip()
    ]
    counts = Counter(label for _, label in rows)
    if len(counts) < 2:
        raise ConfigError(
            f"{where} has {len(counts)} distinct label(s) in column {config.label_column!r}: "
            "classification needs at least 2; pass --label-column naming the label column"
        )
    rare = sorted(label for label, n in counts.items() if n < 2)
    if rare:
        raise ConfigError(
            f"{where}: label {rare[0]!r} has 1 example ({len(rare)} such labels): give every label "
            "at least 2 examples, or drop those rows"
        )
    labels = sorted(counts)
    ids = {name: i for i, name in enumerate(labels)}
    split: dict[bool, list[tuple[str, int]]] = {False: [], True: []}
    for text, label in rows:
        held_out = is_validation(hashlib.sha256(text.encode("utf-8")).hexdigest(), config.validation_fraction)
        split[held_out].append((text, ids[label]))
    if not split[False] or not split[True]:
        raise ConfigError(
            f"{where}: {len(rows)} texts give {len(split[False])} train and {len(split[True])} "
            "held-out texts: add texts or change --validation-fraction"
        )
    return LabelledTexts(labels, split[False], split[True], f"{where} ({len(labels)} labels)")


def load_texts(config: ClassifyDataConfig, corpus_dir: Path | None = None) -> LabelledTexts:
    """The labelled texts `config` names; the default task needs the corpus folder."""
    if config.classify_data != CORPUS:
        return labelled_file_texts(config)
    if corpus_dir is None:
        raise ConfigError(
            "the default classification task needs a corpus: pass --corpus-dir, or --classify-data "
            "with a labelled file"
        )
    return source_group_texts(Path(corpus_dir), config)


# ---------------------------------------------------------------- model


class SequenceClassifier(nn.Module):
    """A GPT trunk and a linear head on the hidden state of each row's last real token.

    forward(idx (B, T) right-padded with PAD, targets (B,)) -> logits (B, classes) and the cross-entropy,
    per row with reduction "none": the call `llmcore.train.fit` makes.
    """

    def __init__(self, trunk: GPT, num_classes: int, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.config: GPTConfig = trunk.config  # fit keys checkpoints on it
        self.label_head = nn.Linear(trunk.config.n_embd, num_classes)
        nn.init.normal_(self.label_head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.label_head.bias)
        weights = torch.ones(num_classes) if class_weights is None else class_weights.float()
        self.register_buffer("class_weights", weights, persistent=False)  # a training choice, not saved

    def pool(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, C): the trunk's final normed hidden state at position lengths - 1 of each row of idx (B, T)."""
        B, T = idx.size()
        trunk = self.trunk
        if T > trunk.config.block_size:
            raise ConfigError(
                f"text of {T} tokens is longer than the model supports ({trunk.config.block_size}): "
                f"pass --max-length <= {trunk.config.block_size}"
            )
        # GPT.forward up to its output projection, which a classifier does not need.
        x = trunk.run_blocks(trunk.wte(idx), trunk.cos[:T], trunk.sin[:T])  # no cache, causal mask
        hidden = trunk.norm_f(x)  # (B, T, C)
        return hidden[torch.arange(B, device=idx.device), lengths - 1]  # (B, C)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        lengths = (idx != PAD).sum(dim=1).clamp(min=1)  # (B,)
        longest = int(lengths.max())  # padding past the longest row is not run at all
        logits = self.label_head(self.pool(idx[:, :longest].clamp(min=0), lengths)).float()  # (B, classes)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits, targets, weight=self.class_weights, reduction=reduction)

    def flops_per_token(self) -> float:
        return self.trunk.flops_per_token()


def save_classifier(path: Path, model: SequenceClassifier, labels: list[str], max_length: int) -> None:
    """Weights, trunk config, label names (id = position) and the text length read, atomically."""
    buffer = io.BytesIO()
    torch.save(
        {
            "model_config": asdict(model.config),
            "model": model.state_dict(),
            "labels": list(labels),
            "max_length": max_length,
        },
        buffer,
    )
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_classifier(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[SequenceClassifier, list[str], int]:
    """(model in eval mode, label names, max_length) from a file written by `save_classifier`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"classifier file {path} does not exist: run classification fine-tuning first")
    state = torch.load(path, map_location=device, weights_only=True)  # tensors, numbers and strings only
    if "labels" not in state:
        raise ConfigError(
            f"{path} is not a classifier (no labels): pass a model.pt written by llmcore.classify"
        )
    model = SequenceClassifier(GPT(GPTConfig(**state["model_config"])), len(state["labels"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), list(state["labels"]), int(state["max_length"])


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, list[bool]]:
    """(N, max_length) int32 ids, right-padded with PAD, each text cut to its first max_length tokens; and
    which texts were cut. Training, evaluation and the pyfunc model all read texts through this."""
    ids = tokenizer.encode_batch(list(texts))
    rows = torch.full((len(ids), max_length), PAD, dtype=torch.int32)
    for i, row in enumerate(ids):
        row = row[:max_length] or [tokenizer.eot_id]  # an empty text is still one position to pool
        rows[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return rows, [len(row) > max_length for row in ids]


@torch.no_grad()
def predict_proba(
    model: nn.Module, rows: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(N, classes) class probabilities of encoded rows, in eval mode."""
    was_training = model.training
    model.eval().to(device)
    out = [
        F.softmax(model(rows[i : i + batch_size].long().to(device))[0], dim=-1).cpu()
        for i in range(0, len(rows), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.label_head.out_features)


# ---------------------------------------------------------------- metrics


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the classes present in truth or predictions, as scikit-learn does) and
    per-class precision/recall/F1/support."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": [
            {
                "label": labels[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in ids
        ],
    }


def confusion_png(y_true: list[int], y_pred: list[int], labels: list[str], title: str) -> bytes:
    """A confusion-matrix figure (rows: true label, columns: predicted) as PNG bytes (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    size = 2.5 + 0.6 * len(labels)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever backend pyplot would pick
    axes = figure.add_subplot()
    ConfusionMatrixDisplay(matrix, display_labels=labels).plot(ax=axes, xticks_rotation=45, colorbar=False)
    axes.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# ---------------------------------------------------------------- training


def _class_weights(train_labels: list[int], num_classes: int) -> torch.Tensor:
    """n / (classes * n_c): 1 on average over the training rows ("balanced", as scikit-learn defines it)."""
    counts = torch.bincount(torch.tensor(train_labels), minlength=num_classes).float()
    return len(train_labels) / (num_classes * counts.clamp(min=1))


def train_classifier(
    base_model: Path,
    tokenizer_dir: Path,
    data: LabelledTexts,
    config: ClassifyConfig,
    adapter: AdapterConfig,
    train: TrainConfig,
    out_dir: Path,
    tracker: Tracker = NullTracker(),
) -> dict[str, Any]:
    """Fine-tune a classifier from the pretrained model.pt on `data`, score it and both baselines on the
    held-out texts; write out_dir/model.pt (merged), adapter/ (LoRA), confusion.png and manifest.json.

    A finished out_dir made with the same inputs is returned as is; a killed run resumes.
    """
    out_dir = Path(out_dir)
    trunk = load_model(base_model)
    block = trunk.config.block_size
    if config.max_length is not None and config.max_length > block:
        raise ConfigError(
            f"max_length {config.max_length} is longer than the model's context {block}: "
            f"pass --max-length <= {block}"
        )
    require_one_choice_of_weights(config, adapter)
    max_length = config.max_length or block
    inputs = {
        "base_model": file_digest(Path(base_model)),
        "data": data.digest(),
        "classify": asdict(config),
        "adapter": asdict(adapter),
        "max_length": max_length,
    }
    identity = run_identity(trunk.config, train, inputs)
    if is_finished(out_dir):
        manifest = read_json(out_dir / MANIFEST)
        require_same_run(out_dir, manifest["identity"], identity)
        log.info("classify: %s is finished, reusing it", out_dir)
        return manifest

    tokenizer = Tokenizer.load(tokenizer_dir)
    labels, num_classes = data.labels, len(data.labels)
    train_rows, train_cut = encode_texts(tokenizer, [t for t, _ in data.train], max_length)
    val_rows, val_cut = encode_texts(tokenizer, [t for t, _ in data.validation], max_length)
    train_y = torch.tensor([y for _, y in data.train])
    val_y = torch.tensor([y for _, y in data.validation])
    batches = Batches(
        len(train_rows), lambda i: (train_rows[i].long(), train_y[i]), train.batch_size, train.seed
    )
    val_batches = Batches(
        len(val_rows), lambda i: (val_rows[i].long(), val_y[i]), train.batch_size, train.seed
    )

    torch.manual_seed(train.seed)
    weights = _class_weights(train_y.tolist(), num_classes) if config.class_weights else None
    model: nn.Module = SequenceClassifier(trunk, num_classes, weights)
    if adapter.finetune_method == "lora":
        model = apply_lora(model, adapter, modules_to_save=("label_head",))
    elif config.freeze_trunk:
        trunk.requires_grad_(False)
    counts = parameter_counts(model)
    log.info(
        "classify: %d classes, %d train / %d held-out texts (%d / %d cut to %d tokens), %s: %s of %s "
        "parameters train",
        num_classes,
        len(train_rows),
        len(val_rows),
        sum(train_cut),
        sum(val_cut),
        max_length,
        adapter.finetune_method + (" (frozen trunk)" if config.freeze_trunk else ""),
        f"{counts['trainable_params']:,}",
        f"{counts['total_params']:,}",
    )
    history = fit(
        model,
        batches,
        val_batches.in_order(train.eval_batches),
        train,
        out_dir / "checkpoints",
        tracker=tracker,
        stage="classify",
        sequence_length=max_length,
        inputs=inputs,
        pad_id=PAD,
    )

    if adapter.finetune_method == "lora":
        save_adapter(model, out_dir / "adapter")
        model = merge(model)
    save_classifier(out_dir / "model.pt", model.to("cpu"), labels, max_length)
    started = time.perf_counter()
    probabilities = predict_proba(model, val_rows, config.eval_batch_size, resolve_device(train.device))
    predicted = probabilities.argmax(dim=-1).tolist()
    truth = val_y.tolist()
    # The baselines read the very text the classifier read: a cut text is cut for them too.
    train_texts = [
        tokenizer.decode(r[r != PAD].tolist()) if cut else t
        for (t, _), r, cut in zip(data.train, train_rows, train_cut, strict=True)
    ]
    val_texts = [
        tokenizer.decode(r[r != PAD].tolist()) if cut else t
        for (t, _), r, cut in zip(data.validation, val_rows, val_cut, strict=True)
    ]
    from llmcore.baselines import majority_class, tfidf_logistic_regression

    results = {
        "classifier": classification_metrics(truth, predicted, labels),
        "majority": classification_metrics(truth, majority_class(train_y.tolist(), len(truth)), labels),
        "tfidf": classification_metrics(
            truth,
            tfidf_logistic_regression(
                train_texts, train_y.tolist(), val_texts, balanced=config.class_weights, seed=train.seed
            ),
            labels,
        ),
    }
    train_counts = Counter(train_y.tolist())
    val_counts = Counter(truth)
    metrics = {
        f"{name}_{key}": result[key] for name, result in results.items() for key in ("accuracy", "macro_f1")
    }
    metrics |= {f"finetune/{k}": v for k, v in counts.items()}
    metrics |= {
        "classify/num_classes": num_classes,
        "classify/train_texts": len(train_rows),
        "classify/validation_texts": len(val_rows),
        "classify/texts_cut": sum(train_cut) + sum(val_cut),
        # class imbalance: largest over smallest training class, and the held-out majority share
        "classify/imbalance_ratio": max(train_counts.values()) / max(1, min(train_counts.values())),
        "classify/validation_majority_share": max(val_counts.values()) / max(1, len(truth)),
        "classify/eval_seconds": time.perf_counter() - started,
        **{f"classify/final_{k}": v for k, v in history.items()},
    }
    per_class = [
        {**row, "train": train_counts.get(i, 0), "tfidf_f1": results["tfidf"]["per_class"][i]["f1"]}
        for i, row in enumerate(results["classifier"]["per_class"])
    ]

    accuracy = metrics["classifier_accuracy"]
    title = f"classifier ({adapter.finetune_method}) on held-out texts: accuracy {accuracy:.3f}"
    atomic_write_bytes(out_dir / "confusion.png", confusion_png(truth, predicted, labels, title))
    manifest = {
        "stage": "classify",
        "model": "model.pt",
        "labels": labels,
        "data": data.description,
        "max_length": max_length,
        "base_model": str(Path(base_model).resolve()),
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "classify_config": asdict(config),
        "adapter_config": asdict(adapter),
        "train_config": asdict(train),
        "metrics": metrics,
        "per_class": per_class,
        "identity": identity,
        "adapter": "adapter" if adapter.finetune_method == "lora" else None,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmcore.classify",
        description="Classification fine-tuning from a pretrained model.pt.",
    )
    parser.add_argument("--base", type=Path, required=True, help="model.pt written by pretraining")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, help="corpus folder (the default source-group task)")
    parser.add_argument("--out", type=Path, required=True)
    configs = (ClassifyDataConfig, ClassifyConfig, AdapterConfig, TrainConfig)
    for config_class in configs:
        add_config_flags(parser, config_class)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        built = [replace(DEFAULT_TRAIN if c is TrainConfig else c(), **given(c, args)) for c in configs]
        data = load_texts(built[0], args["corpus"])
        manifest = train_classifier(args["base"], args["tokenizer"], data, *built[1:], args["out"])
    except ConfigError as error:
        parser.error(str(error))
    print(
        json.dumps(
            {k: round(v, 4) for k, v in manifest["metrics"].items() if not k.startswith("classify/final_")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
