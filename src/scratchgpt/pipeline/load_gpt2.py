"""The fine-tuning stages' base model: the `load-gpt2` stage (the book's section 5.5 and chapter 6 set-up).

`LoadGPT2Params.base` picks the weights:
- `pretrain`: this pipeline's own checkpoint (`models/pretrain`, the CPU preset's default);
- `gpt2-small|gpt2-medium|gpt2-large|gpt2-xl`: OpenAI's weights as Hugging Face `model.safetensors`
  from `openai-community/gpt2*`, pinned by revision, size and sha256 (`OFFICIAL`), fetched by the
  download stage's downloader (progress bar, Range resume, retries, sha256, `SCRATCHGPT_MIRROR`);
- an `http(s)://` URL of a GPT-2 `model.safetensors`, with its `sha256`;
- a local path: a Hugging Face GPT-2 directory or lone `model.safetensors`, a book `model.pth`
  state_dict (read with `weights_only=True`), or a scratchgpt checkpoint directory.

The stage converts it to our layout in `models/base/` (`model.safetensors` + `config.json` recording
where it came from), measures its loss and perplexity on the pretraining val windows, and logs a greedy
continuation of the start context to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from scratchgpt.data.datasets import TokenWindowDataset
from scratchgpt.data.download import DownloadError, DownloadParams, download_source, mirror_from_env
from scratchgpt.data.sources import Source
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn import checkpoint
from scratchgpt.nn.generate import text_sampler
from scratchgpt.nn.model import GPTModel
from scratchgpt.pipeline import stage
from scratchgpt.plumbing import fileio, tracking
from scratchgpt.plumbing.params import ParamsError, check_choice, check_int, check_str
from scratchgpt.train import distributed
from scratchgpt.train.evaluation import evaluate_dataset
from scratchgpt.train.losses import lm_loss

log = logging.getLogger(__name__)

STAGE = "load-gpt2"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class OfficialWeights:
    """One of OpenAI's GPT-2 checkpoints on the Hugging Face hub, pinned."""

    repo: str
    """Hugging Face repository, e.g. `openai-community/gpt2`."""
    revision: str
    """The repository commit the file is taken from."""
    size: int
    """Bytes of `model.safetensors`."""
    sha256: str
    """sha256 of `model.safetensors` (its Git LFS object id)."""


# gpt2-small's pin comes from the project's issue tracker; the other three from manifests of public
# projects that downloaded and hashed the files at these revisions (two agree on each of medium and
# large's hashes; large's and xl's sizes come from one manifest each, and fit the parameter count).
# Checked here only for consistency: this machine cannot reach huggingface.co.
OFFICIAL: dict[str, OfficialWeights] = {
    "gpt2-small": OfficialWeights(
        "openai-community/gpt2",
        "607a30d783dfa663caf39e06633721c8d4cfcd7e",
        548_105_171,
        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    ),
    "gpt2-medium": OfficialWeights(
        "openai-community/gpt2-medium",
        "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
        1_519_984_962,
        "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
    ),
    "gpt2-large": OfficialWeights(
        "openai-community/gpt2-large",
        "32b71b12589c2f8d625668d2335a01cac3249519",
        3_247_159_078,
        "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
    ),
    "gpt2-xl": OfficialWeights(
        "openai-community/gpt2-xl",
        "15ea56dee5df4983c59b2538573817e1667135e2",
        6_431_829_964,
        "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
    ),
}


@dataclass
class LoadGPT2Params:
    """The `load_gpt2` section of params.yaml."""

    base: str = "pretrain"
    """pretrain | gpt2-small | gpt2-medium | gpt2-large | gpt2-xl | an http(s) URL | a local path."""
    sha256: str | None = None
    """sha256 of the weights file: required for a URL, optional for a local file (then checked)."""
    n_heads: int | None = None
    """Attention heads, for a lone weights file of a width OpenAI did not publish (else inferred)."""
    weights_dir: str = "data/weights"
    """Where downloaded official weights are kept (a cache outside the DVC outputs)."""
    batch_size: int = 8
    """Val windows per forward pass when measuring the base's loss."""
    eval_batches: int | None = None
    """Batches of val windows for the loss; null = all."""
    start_context: str = "Every effort moves you"
    """Prompt continued greedily, to see what the base model says."""
    sample_tokens: int = 30
    """Tokens generated for that continuation."""
    device: str = "auto"
    """auto | cpu | cuda | mps."""

    def __post_init__(self) -> None:
        check_str(self, "base")
        if self.sha256 is not None and not (
            isinstance(self.sha256, str) and len(self.sha256) == 64 and set(self.sha256) <= set("0123456789abcdef")
        ):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if is_url(self.base) and self.sha256 is None:
            raise ValueError(f"base {self.base!r} is a URL: pin it with load_gpt2.sha256")
        if self.base in OFFICIAL and self.sha256 not in (None, OFFICIAL[self.base].sha256):
            raise ValueError(f"base {self.base} is pinned already; sha256 must be null")
        check_str(self, "weights_dir")
        check_int(self, "batch_size", 1)
        check_int(self, "sample_tokens", 0)
        for name in ("n_heads", "eval_batches"):
            if getattr(self, name) is not None:
                check_int(self, name, 1)
        check_str(self, "start_context")
        check_choice(self, "device", distributed.DEVICES)


@dataclass(frozen=True)
class LoadGPT2Paths:
    """Where the stage reads and writes (relative to the project root, as in dvc.yaml)."""

    pretrain_dir: Path = Path("models/pretrain")
    data_dir: Path = Path("data/processed/pretrain")
    vocab_dir: Path = Path("data/raw")
    out_dir: Path = Path("models/base")
    metrics: Path = Path("metrics/load_gpt2.json")


def is_url(base: str) -> bool:
    return urlsplit(base).scheme in ("http", "https")


def official_source(name: str, endpoint: str | None = None) -> Source:
    """The pinned download of official size `name` (`HF_ENDPOINT` may point at a hub mirror)."""
    pin = OFFICIAL[name]
    endpoint = (endpoint or os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")
    return Source(
        name=name,
        url=f"{endpoint}/{pin.repo}/resolve/{pin.revision}/model.safetensors",
        filename=f"{name}.safetensors",
        sha256=pin.sha256,
        mirror_name=f"{name}.safetensors",
    )


def fetch_weights(source: Source, download: DownloadParams) -> Path:
    """The verified weights file of `source` in `download.out_dir`, downloading it if needed.

    Without a mirror, a host that cannot be reached fails at once (no retries) with what to do instead.
    """
    dest = Path(download.out_dir) / source.filename
    mirror = mirror_from_env()
    hint = (
        f"Offline, put a copy as $SCRATCHGPT_MIRROR/{source.basename} (sha256 {source.sha256}), "
        f"or fine-tune this pipeline's own model instead: load_gpt2.base=pretrain"
    )
    if mirror is None and not dest.is_file():
        _check_reachable(source.url, download.connect_timeout, hint)
    try:
        download_source(source, download, mirror=mirror)
    except DownloadError as exc:
        raise DownloadError(f"{exc}. {hint}") from exc
    return dest


def _check_reachable(url: str, timeout: float, hint: str) -> None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise DownloadError(f"cannot reach {parts.hostname}:{port} to download {url} ({exc}). {hint}") from exc


def load_base(params: LoadGPT2Params, paths: LoadGPT2Paths, download: DownloadParams) -> tuple[GPTModel, dict]:
    """The base model and a record of where it came from (for config.json)."""
    base = params.base
    if base == "pretrain":
        weights = paths.pretrain_dir / checkpoint.WEIGHTS_FILE
        stage.require_files([weights], "pretrain")
        with stage.made_by("pretrain", paths.pretrain_dir):
            model = checkpoint.load_model(paths.pretrain_dir)
        return model, {"kind": "pretrain", "path": str(paths.pretrain_dir), "sha256": fileio.sha256_file(weights)}
    if base in OFFICIAL:
        pin = OFFICIAL[base]
        source = official_source(base)
        weights = fetch_weights(source, download)
        record = {"kind": "official", "name": base, "repo": pin.repo, "revision": pin.revision, "url": source.url}
        return checkpoint.load_hf_gpt2(weights, n_heads=params.n_heads), {**record, "sha256": pin.sha256}
    if is_url(base):
        assert params.sha256 is not None  # LoadGPT2Params requires it
        name = Path(urlsplit(base).path).name or "model.safetensors"
        source = Source(name="url", url=base, filename=f"url-{params.sha256[:12]}-{name}", sha256=params.sha256)
        weights = fetch_weights(source, download)
        model = checkpoint.load_hf_gpt2(weights, n_heads=params.n_heads)
        return model, {"kind": "url", "url": base, "sha256": params.sha256}
    return _load_local(Path(base), params)


def _load_local(path: Path, params: LoadGPT2Params) -> tuple[GPTModel, dict]:
    if not path.exists():
        raise FileNotFoundError(
            f"load_gpt2.base {str(path)!r} is neither 'pretrain', an official size ({', '.join(OFFICIAL)}), "
            "a URL, nor an existing path"
        )
    weights = path / checkpoint.WEIGHTS_FILE if path.is_dir() else path
    stage.require_files([weights], "a weights-producing")
    digest = fileio.sha256_file(weights)
    if params.sha256 is not None and digest != params.sha256:
        raise DownloadError(f"{weights}: sha256 mismatch: expected {params.sha256}, got {digest}")
    record = {"kind": "path", "path": str(path), "sha256": digest}
    if path.is_dir() and _is_scratchgpt_checkpoint(path):
        return checkpoint.load_model(path), {**record, "format": "scratchgpt"}
    if weights.suffix == ".safetensors":
        return checkpoint.load_hf_gpt2(path, n_heads=params.n_heads), {**record, "format": "huggingface"}
    if weights.suffix in (".pth", ".pt"):
        model = checkpoint.load_book_state_dict_inferred(weights, n_heads=params.n_heads)
        return model, {**record, "format": "book-state-dict"}
    raise ParamsError(f"{path}: expected a .safetensors or .pth file, or a checkpoint directory")


def _is_scratchgpt_checkpoint(directory: Path) -> bool:
    config = directory / checkpoint.CONFIG_FILE
    return config.is_file() and "model" in json.loads(config.read_text(encoding="utf-8"))


def _short(base: str) -> str:
    """The base as a run's name shows it: a URL or path by its last part."""
    path = urlsplit(base).path if is_url(base) else base
    return Path(path.rstrip("/")).name or base if ("/" in base or os.sep in base) else base


def run_load_gpt2(
    params: LoadGPT2Params, download: DownloadParams, paths: LoadGPT2Paths = LoadGPT2Paths()
) -> dict[str, Any]:
    """Run the stage; returns the metrics written."""
    stage.check_tracking()
    val_file = paths.data_dir / "val.parquet"
    stage.require_files([val_file], "sample-to-parquet")
    tokenizer = gpt2_tokenizer(paths.vocab_dir)
    _, device = distributed.setup(params.device)
    with tracking.stage_run(STAGE, {"load_gpt2": params}, details=[f"base {_short(params.base)}"]) as run:
        model, source = load_base(params, paths, download)
        cfg = model.cfg
        with stage.made_by("sample-to-parquet", val_file):
            val = TokenWindowDataset(val_file)
        if val.max_length > cfg.context_length:
            raise ParamsError(
                f"the base's context ({cfg.context_length}) is shorter than the val windows ({val.max_length})"
            )
        log.info("base %s: %s parameters, %s", params.base, f"{model.num_parameters():,}", cfg)
        checkpoint.save_model(model, paths.out_dir, extra={"source": source})
        model.to(device).eval()
        loss = evaluate_dataset(
            model, val, lm_loss, batch_size=params.batch_size, device=device, max_batches=params.eval_batches
        )["loss"]
        sample = text_sampler(
            lambda s: tokenizer.encode(s, allowed_special={"<|endoftext|>"}),
            tokenizer.decode,
            params.start_context,
            min(params.sample_tokens, cfg.context_length - len(tokenizer.encode(params.start_context))),
        )
        with torch.no_grad():
            text = sample(model, device)
        log.info("greedy continuation: %r", text)
        metrics = {  # numbers only; where the base came from is in models/base/config.json and the run's tags
            "parameters": model.num_parameters(),
            "val_loss": loss,
            "val_perplexity": math.exp(min(loss, 700.0)),
            "val_windows": min(len(val), (params.eval_batches or len(val)) * params.batch_size),
        }
        fileio.write_json(paths.metrics, metrics)  # the outputs first: tracking may fail
        run.set_tags({f"source.{k}": v for k, v in source.items()})
        run.log_metrics(metrics)
        run.log_text(text, "samples/start_context.txt")
        run.log_artifact(paths.out_dir / checkpoint.CONFIG_FILE)
    return metrics
