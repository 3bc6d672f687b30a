"""A GPT with a classification head (the book's chapter 6): data, padding, saving, loading and prediction.

    python -m scratchgpt.classify "You are a winner, claim your prize now"          # models/<cls.name>
    python -m scratchgpt.classify --model models/spam-classifier --file messages.txt   # one text per line
    cat messages.txt | python -m scratchgpt.classify --probabilities                   # every class's too

prints one line per text: the label, its probability and the text (with --probabilities, every class's
probability before the text). `--model` defaults to models/<cls.name> of ./params.yaml (models/
spam-classifier without one). The model directory is self-contained: `model.safetensors` and `config.json`
(the GPT config, the class names, how texts are padded and pooled) and the GPT-2 vocabulary the texts are
encoded with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from scratchgpt.data.datasets import DatasetError, read_parquet
from scratchgpt.data.tokenizer import ENCODER_JSON, VOCAB_BPE, gpt2_tokenizer
from scratchgpt.nn import checkpoint
from scratchgpt.nn.model import GPTConfig, GPTModel
from scratchgpt.plumbing import cli, fileio
from scratchgpt.plumbing.params import ParamsError, read_params
from scratchgpt.train import distributed
from scratchgpt.train.losses import classification_logits

log = logging.getLogger(__name__)

PAD_ID = 50256  # <|endoftext|>, as the book pads
REMAKE = ("The lora-cls-finetune stage writes models/spam-classifier: restore it with `dvc checkout --force "
          "models/spam-classifier`, or make it again with `dvc repro lora-cls-finetune`")  # fmt: skip


class ClassificationDataset(Dataset):
    """`(token ids, label)` pairs of a Parquet split with `token_ids` and `label` columns, held in memory.

    Texts longer than `max_length` are truncated (to their first `max_length` tokens, as the book).
    """

    def __init__(self, path: str | os.PathLike[str], max_length: int, labels: Sequence[str]) -> None:
        self.path = Path(path)
        table = read_parquet(self.path, columns=["token_ids", "label"])
        self.labels = [int(v) for v in table.column("label").to_pylist()]
        bad = [(i, v) for i, v in enumerate(self.labels) if not 0 <= v < len(labels)]
        if bad:
            row, value = bad[0]
            raise DatasetError(
                f"{self.path}: row {row} has label {value}, outside 0..{len(labels) - 1} ({', '.join(labels)})"
            )
        self.ids = [torch.tensor(ids[:max_length], dtype=torch.long) for ids in table.column("token_ids").to_pylist()]
        if any(len(ids) == 0 for ids in self.ids):
            raise DatasetError(f"{self.path}: a text has no tokens")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.ids[index], self.labels[index]

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.ids)


def pad_collate(pad_to: int | None = None, pad_id: int = PAD_ID) -> Callable[[list[Any]], tuple[Tensor, ...]]:
    """Batch `(ids, label)` items as `(inputs (B, T), lengths (B,), labels (B,))`, right-padded with
    `pad_id` to the longest in the batch, or to `pad_to` for every batch (the book's fixed length)."""

    def collate(items: list[Any]) -> tuple[Tensor, ...]:
        lengths = torch.tensor([len(ids) for ids, _ in items], dtype=torch.long)
        width = pad_to or int(lengths.max())
        inputs = torch.full((len(items), width), pad_id, dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            inputs[row, : len(ids)] = ids
        return inputs, lengths, torch.tensor([label for _, label in items], dtype=torch.long)

    return collate


def real_tokens(batch: tuple[Tensor, ...]) -> int:
    """Tokens of a batch without its padding (the trainer's `tokens_fn`)."""
    return int(batch[1].sum())


def attach_head(model: GPTModel, num_classes: int) -> GPTModel:
    """Replace the vocabulary head by a fresh `num_classes`-way linear layer (with bias, as the book)."""
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes).to(model.tok_emb.weight.device)
    model.cfg = dataclasses.replace(model.cfg, tie_weights=False)  # the new head shares nothing
    return model


@dataclasses.dataclass(frozen=True)
class ClassifierInfo:
    """How a saved classifier reads texts (the `classifier` section of its config.json)."""

    labels: tuple[str, ...]
    """Class names in output order (the book's: ham, spam)."""
    pool: str
    """last-token | last-position (see scratchgpt.train.losses.POOLS)."""
    max_length: int
    """Texts are truncated to this many tokens."""
    pad_to: int | None
    """Pad every batch to this length (the book's fixed 120), or null for the batch's longest text."""


def save_classifier(model: GPTModel, directory: str | os.PathLike[str], info: ClassifierInfo, *,
                    vocab_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
    """Write the classifier (merged weights, config.json, the vocabulary) as one atomic directory."""
    if any(name.endswith((".A", ".B")) for name, _ in model.named_parameters()):
        raise ValueError("merge the LoRA layers (scratchgpt.nn.lora.merge_lora) before saving the classifier")
    with fileio.atomic_dir(directory) as tmp:
        checkpoint.save_model(model, tmp, extra={"classifier": dataclasses.asdict(info), **(extra or {})})
        for name in (VOCAB_BPE, ENCODER_JSON):
            shutil.copyfile(Path(vocab_dir) / name, tmp / name)


def load_classifier(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[GPTModel, ClassifierInfo]:
    """A classifier written by `save_classifier`, in eval mode, and how it reads texts."""
    directory = Path(directory)
    config = checkpoint.load_config(directory)
    if "classifier" not in config:
        raise checkpoint.CheckpointError(f"{directory} is not a classifier (no 'classifier' in its config.json)")
    raw = config["classifier"]
    info = ClassifierInfo(tuple(raw["labels"]), raw["pool"], raw["max_length"], raw["pad_to"])
    model = attach_head(GPTModel(GPTConfig.from_dict(config["model"])), len(info.labels))
    checkpoint.load_weights(model, checkpoint.read_safetensors(directory / checkpoint.WEIGHTS_FILE))
    return model.to(device).eval(), info


@torch.no_grad()
def predict_proba(model: nn.Module, ids: Sequence[Tensor], info: ClassifierInfo, *, batch_size: int = 32,
                  device: torch.device | str = "cpu") -> Tensor:
    """Class probabilities (N, C) of token-id sequences (each truncated to `info.max_length`)."""
    collate = pad_collate(info.pad_to)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(ids), batch_size):
            items = [(seq[: info.max_length], 0) for seq in ids[start : start + batch_size]]
            inputs, lengths, labels = (t.to(device) for t in collate(items))
            out.append(classification_logits(model, (inputs, lengths, labels), info.pool).float().softmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, len(info.labels))


def classify_texts(directory: str | os.PathLike[str], texts: Sequence[str], *, batch_size: int = 32,
                   device: str = "auto") -> list[tuple[str, float]]:
    """`(label, probability)` for each text, with the classifier in `directory`."""
    return [(label, prob) for label, prob, _ in classify_texts_all(directory, texts, batch_size=batch_size,
                                                                   device=device)]  # fmt: skip


def classify_texts_all(directory: str | os.PathLike[str], texts: Sequence[str], *, batch_size: int = 32,
                       device: str = "auto") -> list[tuple[str, float, dict[str, float]]]:
    """`(label, probability, {class: probability})` for each text, with the classifier in `directory`."""
    dev = distributed.resolve_device(device)
    model, info = load_classifier(directory, dev)
    probs = text_probabilities(model, info, gpt2_tokenizer(directory), texts, batch_size=batch_size, device=dev)
    return [(*best, every) for best, every in zip(best_labels(info, probs), class_probabilities(info, probs),
                                                   strict=True)]  # fmt: skip


def text_probabilities(model: nn.Module, info: ClassifierInfo, tokenizer, texts: Sequence[str], *,
                       batch_size: int = 32, device: torch.device | str = "cpu") -> Tensor:  # fmt: skip
    """Class probabilities (N, C) of texts, with a loaded classifier and its tokenizer (an empty text reads as
    one padding token)."""
    ids = [torch.tensor(tokenizer.encode_ordinary(text) or [PAD_ID], dtype=torch.long) for text in texts]
    return predict_proba(model, ids, info, batch_size=batch_size, device=device)


def best_labels(info: ClassifierInfo, probs: Tensor) -> list[tuple[str, float]]:
    """`(label, probability)` of each row's most probable class."""
    best = probs.argmax(-1)
    return [(info.labels[int(k)], float(probs[i, k])) for i, k in enumerate(best)]


def class_probabilities(info: ClassifierInfo, probs: Tensor) -> list[dict[str, float]]:
    """`{class name: probability}` of each row, in the classes' order."""
    return [dict(zip(info.labels, (float(p) for p in row), strict=True)) for row in probs]


def label_texts(model: nn.Module, info: ClassifierInfo, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                device: torch.device | str = "cpu") -> list[tuple[str, float]]:
    """`(label, probability)` for each text, with a loaded classifier and its tokenizer (an empty text reads
    as one padding token)."""
    return best_labels(info, text_probabilities(model, info, tokenizer, texts, batch_size=batch_size, device=device))


def default_model_dir(params_file: str | os.PathLike[str] = "params.yaml") -> Path:
    """models/<cls.name> of `params_file` (in the working directory), else the book's models/spam-classifier."""
    try:
        name = read_params(params_file).get("cls", {}).get("name")
    except ParamsError:
        name = None
    return Path("models") / (name if isinstance(name, str) and name else "spam-classifier")


def _read_texts(args: Any) -> list[str]:
    if args.texts:
        return list(args.texts)
    source: Iterable[str]
    if args.file is not None:
        source = Path(args.file).read_text(encoding="utf-8").splitlines()
    else:
        if sys.stdin.isatty():
            raise SystemExit("no texts: pass them as arguments, with --file, or on standard input")
        source = sys.stdin.read().splitlines()
    return [line for line in source if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("texts", nargs="*", help="texts to classify (default: --file, else standard input)")
    parser.add_argument("--model", type=Path, default=default_model_dir(),
                        help="classifier directory (default: models/<cls.name> of ./params.yaml: %(default)s)")
    parser.add_argument("--file", type=Path, help="read texts from this file, one per line")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--device", default="auto", choices=distributed.DEVICES, help="where to run")
    parser.add_argument("--json", action="store_true", help="print JSON lines: text, label, probability")
    parser.add_argument("--probabilities", action="store_true", help="also print every class's probability")
    args = parser.parse_args(argv)
    cli.setup_logging(logging.WARNING)
    texts = _read_texts(args)
    try:
        results = classify_texts_all(args.model, texts, batch_size=args.batch_size, device=args.device)
    except checkpoint.CheckpointError as exc:
        raise SystemExit(f"error: {exc}. {REMAKE}") from exc
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    for text, (label, prob, every) in zip(texts, results, strict=True):
        if args.json:
            line = {"text": text, "label": label, "probability": round(prob, 6)}
            if args.probabilities:
                line["probabilities"] = {name: round(p, 6) for name, p in every.items()}
            print(json.dumps(line))
        elif args.probabilities:
            print("\t".join([label, f"{prob:.4f}", *(f"{name}={p:.4f}" for name, p in every.items()), text]))
        else:
            print(f"{label}\t{prob:.4f}\t{text}")


if __name__ == "__main__":
    main()
