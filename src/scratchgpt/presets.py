"""Parameter presets: named sets of overrides to params.yaml, run as a DVC experiment.

A preset is `presets/<name>.yaml`, shaped like params.yaml but holding only the keys it changes.
Every key must already exist in params.yaml, and the merged parameters must validate, before
anything runs.

    python -m scratchgpt.presets book --run              # run `dvc exp run -S key=value ...`
    python -m scratchgpt.presets book --run -- -n book1  # ... with extra `dvc exp run` arguments
    python -m scratchgpt.presets book                    # only print that command (shell-quoted)
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from scratchgpt.plumbing import cli
from scratchgpt.plumbing.params import ParamsError, flatten, from_dict, read_params

log = logging.getLogger(__name__)

PRESETS_DIR = Path("presets")
_PLAIN = re.compile(r"^[A-Za-z0-9_.+\-/:]+$")


def load_preset(name: str, presets_dir: str | os.PathLike[str] = PRESETS_DIR) -> dict[str, Any]:
    """The overrides of preset `name` (a nested mapping)."""
    path = Path(presets_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))
        raise ParamsError(f"no preset {name!r}: {path} not found (presets: {known})")
    return read_params(path)


def apply_preset(params: dict[str, Any], preset: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`params` with `preset` merged in; a key that params.yaml lacks is an error (a typo, surely)."""
    merged = copy.deepcopy(params)
    for key, value in preset.items():
        name = f"{where}.{key}" if where else key
        if key not in merged:
            raise ParamsError(f"preset key {name!r} does not exist in params.yaml")
        if isinstance(value, dict):
            if not isinstance(merged[key], dict):
                raise ParamsError(f"preset key {name!r} is a mapping but params.yaml has a value there")
            merged[key] = apply_preset(merged[key], value, name)
        else:
            merged[key] = value
    return merged


def validate(params: dict[str, Any]) -> None:
    """Validate the sections a preset may touch, and the pretrain/sample cross-checks."""
    from scratchgpt.data.datasets import SampleParams
    from scratchgpt.pipeline.evaluate import EvaluateParams
    from scratchgpt.pipeline.instruct_finetune import InstructParams
    from scratchgpt.pipeline.load_gpt2 import LoadGPT2Params
    from scratchgpt.pipeline.lora_cls_finetune import ClsParams
    from scratchgpt.pipeline.pretrain import PretrainParams, check_params

    sample = from_dict(SampleParams, params.get("sample"), "sample")
    pretrain = from_dict(PretrainParams, params.get("pretrain"), "pretrain")
    check_params(pretrain, sample)
    from_dict(LoadGPT2Params, params.get("load_gpt2"), "load_gpt2")
    from_dict(ClsParams, params.get("cls"), "cls")
    from_dict(InstructParams, params.get("instruct"), "instruct")
    from_dict(EvaluateParams, params.get("evaluate"), "evaluate")


def yaml_value(value: Any) -> str:
    """`value` as a compact YAML literal for `dvc exp run -S key=<literal>`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 readers want 1.0e-08, not 1e-08
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        if _PLAIN.match(value) and yaml.safe_load(value) == value:
            return value
        return "'" + value.replace("'", "''") + "'"
    raise ParamsError(f"cannot pass a {type(value).__name__} value on the command line: {value!r}")


def set_args(preset: dict[str, Any]) -> list[str]:
    """`["-S", "key=value", ...]` for every leaf of `preset`."""
    args: list[str] = []
    for key, value in flatten(preset).items():
        args += ["-S", f"{key}={yaml_value(value)}"]
    return args


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, params=True, prog="python -m scratchgpt.presets")
    parser.add_argument("name", help="preset name: presets/<name>.yaml")
    parser.add_argument("--presets-dir", default=str(PRESETS_DIR), help="(default: %(default)s)")
    parser.add_argument("--run", action="store_true", help="run `dvc exp run` with the preset")
    parser.add_argument("--", dest="dvc_args", metavar="DVC_ARGS", help="then extra `dvc exp run` arguments")
    argv = list(sys.argv[1:] if argv is None else argv)
    dvc_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    cli.setup_logging()
    try:
        preset = load_preset(args.name, args.presets_dir)
        validate(apply_preset(read_params(args.params), preset))
        overrides = set_args(preset)
    except ParamsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc
    cmd = ["dvc", "exp", "run", *overrides, *dvc_args]
    if not args.run:
        print(shlex.join(cmd))  # quoted for pasting into a shell
        return
    log.info("running: %s", shlex.join(cmd))
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
