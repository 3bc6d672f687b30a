"""Fine-tuning the base model into a classifier: the `lora-cls-finetune` stage (book ch. 6, appendix E).

`ClsParams` is the `cls` section of params.yaml; `run_lora_cls_finetune` does the whole stage: validate,
load `models/base`, replace its vocabulary head by a head with one output per class (the class names come
with the data: `scratchgpt.data.datasets.LabelInfo`), make the chosen part trainable (`mode`: LoRA adapters
on every linear layer, the last block + final norm + head, or everything), train with the shared `Trainer`
(accuracy as a metric, optionally class-weighted; checkpoints and `resume: auto` in `models/<name>-ckpt`),
then merge the adapters, measure train/val/test accuracy and the test precision/recall/F1 (scikit-learn: of
the positive class for the book's spam data, else macro averages and every class's own) on the full
splits, and write the classifier (`models/<name>`, registered in MLflow under `name`), metrics, plots and
one MLflow run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from scratchgpt.apps import serving
from scratchgpt.apps.classify import (
    ClassificationDataset,
    ClassifierInfo,
    attach_head,
    pad_collate,
    predict_proba,
    real_tokens,
    save_classifier,
)
from scratchgpt.data.datasets import SPAM_INFO, DatasetError, LabelInfo, read_label_info, read_parquet
from scratchgpt.nn import checkpoint, lora
from scratchgpt.nn.model import GPTModel
from scratchgpt.pipeline import stage
from scratchgpt.plumbing import plots, tracking
from scratchgpt.plumbing.params import ParamsError, check_choice, check_int, check_ratio, check_str
from scratchgpt.train import distributed
from scratchgpt.train.callbacks import TrackingCallback
from scratchgpt.train.config import TrainConfig
from scratchgpt.train.losses import POOLS, classification_accuracy, classification_loss
from scratchgpt.train.state import seed_everything
from scratchgpt.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

STAGE = "lora-cls-finetune"
MODES = ("lora", "last-block", "full")
CLASS_WEIGHTS = ("none", "balanced")
LABELS = SPAM_INFO.labels  # the book's ("ham", "spam"): label 0, 1 (a run takes its labels from the data)
BOOK_NAME = "spam-classifier"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PLOT_X = ("step", "epoch", "examples_seen")


@dataclass
class ClsParams:
    """The `cls` section of params.yaml."""

    preset: str = "cpu"
    """Name of the parameter preset in use (an MLflow tag)."""
    name: str = BOOK_NAME
    """The classifier's name: it is written to models/<name>/ (checkpoints: models/<name>-ckpt/) and registered
    in MLflow as <name>. The book's spam-classifier names the SMS spam model only: your own data needs its own."""
    mode: str = "lora"
    """lora: LoRA adapters on every linear layer, head included, all else frozen (appendix E);
    last-block: the last transformer block, the final norm and the head (chapter 6); full: everything."""
    lora_rank: int = 16
    """Rank r of the LoRA matrices (mode lora)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: updates are scaled by alpha / rank (the book's code scales by alpha alone)."""
    pool: str = "last-token"
    """Which logits classify a text: last-token (its last real token; padding cannot change the answer) or
    last-position (the padded sequence's last position, as the book)."""
    max_length: int | None = None
    """Truncate texts to this many tokens and pad every batch to it (the book: 120, the longest training
    text); null: pad each batch to its longest text, truncate at the base's context length."""
    drop_rate: float = 0.0
    """Dropout while fine-tuning (the book uses 0)."""
    class_weights: str = "none"
    """none: every text counts the same (the book); balanced: each class's loss is weighted by
    n_train / (classes * its train rows), so rare classes count as much as common ones (imbalanced data)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, batching, evaluation, checkpointing, device and precision."""

    def __post_init__(self) -> None:
        check_str(self, "preset")
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name) or self.name.endswith("-ckpt"):
            raise ValueError(f"name must be letters, digits, '.', '_' or '-' (not ending in -ckpt), got {self.name!r}")
        check_choice(self, "mode", MODES)
        check_choice(self, "class_weights", CLASS_WEIGHTS)
        check_choice(self, "pool", POOLS)
        lora.check_hyperparameters(self.lora_rank, self.lora_alpha)
        if self.max_length is not None:
            check_int(self, "max_length", 1)
        check_ratio(self, "drop_rate", zero=True)
        if not isinstance(self.train, TrainConfig):
            raise ValueError("train must be a mapping")


@dataclass(frozen=True)
class ClsPaths:
    """Where the stage reads and writes (relative to the project root, as in dvc.yaml; `for_name` gives a
    classifier's own directories)."""

    base_dir: Path = Path("models/base")
    data_dir: Path = Path("data/processed/cls")
    vocab_dir: Path = Path("data/raw")
    checkpoint_dir: Path = Path(f"models/{BOOK_NAME}-ckpt")
    out_dir: Path = Path(f"models/{BOOK_NAME}")
    metrics: Path = Path("metrics/cls.json")
    plot_loss_csv: Path = Path("plots/cls_loss.csv")
    plot_accuracy_csv: Path = Path("plots/cls_accuracy.csv")
    plot_loss_png: Path = Path("plots/cls_loss.png")
    plot_accuracy_png: Path = Path("plots/cls_accuracy.png")
    plot_confusion_png: Path = Path("plots/cls_confusion.png")

    @classmethod
    def for_name(cls, name: str) -> ClsPaths:
        """The paths of classifier `name`: models/<name>/ and models/<name>-ckpt/ (dvc.yaml: models/${cls.name})."""
        return cls(checkpoint_dir=Path(f"models/{name}-ckpt"), out_dir=Path(f"models/{name}"))


def load_splits(params: ClsParams, paths: ClsPaths, context_length: int) -> tuple[dict[str, ClassificationDataset],
                                                                                  LabelInfo]:  # fmt: skip
    """train/val/test and their class names, checked before any training: labels, emptiness, the base's
    context, and a name of the classifier's own for data other than the book's."""
    if params.max_length is not None and params.max_length > context_length:
        raise ParamsError(
            f"cls.max_length ({params.max_length}) exceeds the base model's context length ({context_length})"
        )
    stage.require_files([paths.data_dir / f"{split}.parquet" for split in stage.SPLITS], "sample-to-parquet")
    with stage.made_by("sample-to-parquet", paths.data_dir):
        infos = {split: read_label_info(paths.data_dir / f"{split}.parquet") for split in stage.SPLITS}
    info = infos["train"]
    if any(other.labels != info.labels for other in infos.values()):
        raise DatasetError(f"{paths.data_dir}: the splits name different classes; rerun sample-to-parquet")
    if info.dataset != SPAM_INFO.dataset and params.name == BOOK_NAME:
        raise ParamsError(
            f"cls.name is {BOOK_NAME!r}, the book's SMS spam model, but the data is your own ({info.source}: "
            f"{', '.join(info.labels)}): set cls.name to a name of its own (e.g. classifier)"
        )
    max_length = params.max_length or context_length
    splits = stage.load_splits(paths.data_dir, lambda path: ClassificationDataset(path, max_length, info.labels))
    return splits, info


def class_weights(params: ClsParams, train: ClassificationDataset, n_classes: int) -> torch.Tensor | None:
    """`balanced`: n / (classes * count) per class of the train split; None for `none`."""
    if params.class_weights == "none":
        return None
    counts = torch.bincount(torch.tensor(train.labels), minlength=n_classes).double()
    return (counts.sum() / (n_classes * counts)).float()


def build_model(params: ClsParams, base_dir: Path, n_classes: int = len(LABELS)) -> GPTModel:
    """The base with a fresh `n_classes`-way head, only the part `mode` trains left trainable."""
    model = checkpoint.load_model(base_dir, config_overrides={"drop_rate": params.drop_rate})
    attach_head(model, n_classes)
    if params.mode == "lora":
        lora.apply_lora(model, params.lora_rank, params.lora_alpha)
    elif params.mode == "last-block":
        for p in model.parameters():
            p.requires_grad_(False)
        for module in (model.trf_blocks[-1], model.final_norm, model.out_head):
            for p in module.parameters():
                p.requires_grad_(True)
    return model.train()


def run_lora_cls_finetune(params: ClsParams, paths: ClsPaths | None = None) -> dict[str, Any] | None:
    """Run the stage; returns the metrics written (None on DDP ranks other than 0)."""
    paths = paths or ClsPaths.for_name(params.name)
    stage.check_tracking()
    stage.require_files([paths.base_dir / checkpoint.WEIGHTS_FILE], "load-gpt2")
    with stage.made_by("load-gpt2", paths.base_dir):
        base_cfg = checkpoint.load_config(paths.base_dir)["model"]
    splits, labels = load_splits(params, paths, base_cfg["context_length"])
    data = {split: ds.path for split, ds in splits.items()}
    fingerprint = stage.finetune_fingerprint(STAGE, "cls", params, paths.base_dir, data)
    info, device = distributed.setup(params.train.device)
    seed_everything(params.train.seed)
    with stage.made_by("load-gpt2", paths.base_dir):
        model = build_model(params, paths.base_dir, len(labels.labels))
    trainable, total = lora.count_parameters(model)
    log.info(
        "fine-tuning %s of a %s-parameter base (%s trainable, %.2f%%) on %d train / %d val / %d test texts, "
        "%d classes", params.mode, f"{total:,}", f"{trainable:,}", 100 * trainable / total,
        *(len(d) for d in splits.values()), len(labels.labels),
    )  # fmt: skip
    classifier = ClassifierInfo(labels.labels, params.pool, params.max_length or base_cfg["context_length"],
                                params.max_length)  # fmt: skip
    weight = class_weights(params, splits["train"], len(labels.labels))

    with tracking.stage_run(STAGE, {"cls": params}, preset=params.preset, enabled=info.is_main,
                            details=[stage.method_label(params.mode, params.lora_rank)]) as run:  # fmt: skip
        trainer = Trainer(
            model,
            classification_loss(params.pool, weight),
            splits["train"],
            splits["val"],
            params.train,
            paths.checkpoint_dir,
            metric_fns={"accuracy": classification_accuracy(params.pool)},
            collate_fn=pad_collate(params.max_length),
            tokens_fn=real_tokens,
            callbacks=[TrackingCallback(run)],
            fingerprint=fingerprint,
            checkpoint_extra={"cls": dataclasses.asdict(params), "labels": list(labels.labels)},
            desc=STAGE,
        )
        result = trainer.fit()
        if not info.is_main:
            return None
        if params.mode == "lora":
            lora.merge_lora(model)
        model.eval()
        test = test_metrics(model, splits["test"], classifier, device, labels.positive_label)
        metrics = stage_metrics(result, test, trainable, total)
        save_classifier(
            model.cpu(), paths.out_dir, classifier, vocab_dir=paths.vocab_dir,
            extra={"cls": dataclasses.asdict(params), "base": checkpoint.load_config(paths.base_dir).get("source")},
        )  # fmt: skip
        write_plots(result, test["confusion_matrix"], labels.labels, paths)
        artifacts = [paths.plot_loss_png, paths.plot_accuracy_png, paths.plot_confusion_png,
                     paths.plot_loss_csv, paths.plot_accuracy_csv]  # fmt: skip
        stage.finish_run(run, trainer, result, metrics, paths.metrics, artifacts)
        run.log_artifact(paths.out_dir / checkpoint.CONFIG_FILE, "classifier")
        serving.log_classifier(run, paths.out_dir, metrics, {"mode": params.mode, "preset": params.preset},
                               name=params.name, examples=_example_texts(paths.data_dir))  # fmt: skip
    return metrics


def test_metrics(model: GPTModel, test: ClassificationDataset, info: ClassifierInfo, device: torch.device,
                 positive_label: str | None = SPAM_INFO.positive_label) -> dict:  # fmt: skip
    """Accuracy and the confusion matrix; the positive class's precision/recall/F1 when there is one (the
    book's spam), else the macro averages and each class's own (`test_class`), by scikit-learn."""
    probs = predict_proba(model, test.ids, info, batch_size=64, device=device)
    y_pred = probs.argmax(-1).tolist()
    out: dict[str, Any] = {"test_accuracy": float(accuracy_score(test.labels, y_pred))}
    if positive_label is not None:
        precision, recall, f1, _ = precision_recall_fscore_support(
            test.labels, y_pred, pos_label=info.labels.index(positive_label), average="binary", zero_division=0
        )
        out.update({"test_precision": float(precision), "test_recall": float(recall), "test_f1": float(f1)})
    else:
        classes = list(range(len(info.labels)))
        macro = precision_recall_fscore_support(test.labels, y_pred, labels=classes, average="macro", zero_division=0)
        out.update({"test_macro_precision": float(macro[0]), "test_macro_recall": float(macro[1]),
                    "test_macro_f1": float(macro[2])})  # fmt: skip
        each = precision_recall_fscore_support(test.labels, y_pred, labels=classes, average=None, zero_division=0)
        out["test_class"] = {
            name: {"precision": float(each[0][k]), "recall": float(each[1][k]), "f1": float(each[2][k]),
                   "support": int(each[3][k])}
            for k, name in enumerate(info.labels)
        }  # fmt: skip
    out["confusion_matrix"] = confusion_matrix(test.labels, y_pred, labels=range(len(info.labels))).tolist()
    return out


def _example_texts(data_dir: Path, n: int = 2) -> list[str]:
    """The first test texts: the registered model's input example."""
    return read_parquet(data_dir / "test.parquet", columns=["text"]).column("text").to_pylist()[:n]


def stage_metrics(result: TrainResult, test: dict[str, Any], trainable: int, total: int) -> dict[str, Any]:
    """What `metrics/cls.json` reports (numbers only)."""
    final = result.final
    return {
        "train_accuracy": final["train_accuracy"],
        "val_accuracy": final["val_accuracy"],
        **{k: v for k, v in test.items() if k != "confusion_matrix"},
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
        "trainable_parameters": trainable,
        "trainable_share": trainable / total,
        "examples_per_s": result.examples_seen / result.train_time_s if result.train_time_s > 0 else math.nan,
        "examples_seen": result.examples_seen,
        **stage.time_metrics(result),
    }


def write_plots(result: TrainResult, matrix: list[list[int]], labels: tuple[str, ...], paths: ClsPaths) -> None:
    """Loss and accuracy tables (DVC plots) and figures, and the test confusion matrix."""
    stage.write_loss_plots(
        result, paths.plot_loss_csv, paths.plot_loss_png, (*PLOT_X, "train_loss", "val_loss"), "Classifier loss"
    )
    plots.write_plot_csv(result.history, paths.plot_accuracy_csv, (*PLOT_X, "train_accuracy", "val_accuracy"))
    plots.plot_metric(
        result.history, paths.plot_accuracy_png, x_key="epoch", series=("train_accuracy", "val_accuracy"),
        ylabel="Accuracy", xlabel="Epochs", twin_x_key="examples_seen", twin_xlabel="Examples seen",
        title="Classifier accuracy",
    )  # fmt: skip
    plots.plot_confusion_matrix(matrix, labels, paths.plot_confusion_png, title="Test set")
