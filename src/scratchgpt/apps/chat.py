"""Talk to an instruction-tuned model: type an instruction (and optionally an input), read the response
as it is generated, token by token.

    python -m scratchgpt.chat --model models/instruct
    python -m scratchgpt.chat --model models/instruct --once "Name the author of 'Pride and Prejudice'."
    python -m scratchgpt.chat --model models/instruct --once "Rewrite the sentence using a simile." \\
        --input "The car is very fast."

Interactively, an empty line ends the instruction, the next lines (up to an empty line) are its input,
and end-of-file (Ctrl-D) quits. The prompt is the Alpaca format the model was fine-tuned on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from scratchgpt.apps.instruct import END_OF_TEXT, RESPONSE_HEADER, encode_prompt, extract_response
from scratchgpt.data.tokenizer import gpt2_tokenizer
from scratchgpt.nn import checkpoint
from scratchgpt.nn.generate import generate_stream
from scratchgpt.nn.model import GPTModel
from scratchgpt.plumbing import cli
from scratchgpt.train import distributed


def stream_response(
    model: GPTModel, tokenizer, instruction: str, input_text: str = "", *, max_new_tokens: int = 256,
    temperature: float = 0.0, top_k: int | None = None,
) -> Iterator[str]:  # fmt: skip
    """Yield the response piece by piece; the pieces join to what the instruct-finetune stage writes for the
    same record (`extract_response` of the text generated after the Alpaca prompt)."""
    ids = encode_prompt(tokenizer, instruction, input_text)[-(model.cfg.context_length - 1) :]
    idx = torch.tensor([ids], device=model.tok_emb.weight.device)
    budget = min(max_new_tokens, model.cfg.context_length - len(ids))
    tokens: list[int] = []
    shown = ""
    for token in generate_stream(model, idx, budget, temperature=temperature, top_k=top_k, eos_id=END_OF_TEXT):
        tokens.append(int(token[0, 0]))
        ready = _settled(tokenizer.decode(tokens))
        if len(ready) > len(shown):
            yield ready[len(shown) :]
            shown = ready
    final = extract_response(tokenizer.decode(tokens))
    if len(final) > len(shown):
        yield final[len(shown) :]


def _settled(text: str) -> str:
    """The part of the response that later tokens cannot change: no header, no leading or trailing
    whitespace, no half character, no tail that could still grow into a header."""
    body = text.replace(RESPONSE_HEADER, "").lstrip().rstrip("\ufffd").rstrip()
    for k in range(min(len(RESPONSE_HEADER) - 1, len(body)), 0, -1):
        if RESPONSE_HEADER.startswith(body[-k:]):
            return body[:-k].rstrip()
    return body


def _read_block(stream: TextIO, prompt: str, out: TextIO) -> str | None:
    """Lines up to an empty line, joined; None at end of file."""
    out.write(prompt)
    out.flush()
    lines = []
    for line in stream:
        if not line.strip():
            return "\n".join(lines)
        lines.append(line.rstrip("\n"))
    return "\n".join(lines) if lines else None


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/instruct"),
                        help="instruction-tuned model (default: %(default)s)")  # fmt: skip
    parser.add_argument("--once", metavar="INSTRUCTION", help="answer this one instruction and exit")
    parser.add_argument("--input", default="", help="the input that goes with --once's instruction")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest response")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--device", default="auto", choices=distributed.DEVICES, help="where to run")
    args = parser.parse_args(argv)
    cli.setup_logging(logging.WARNING)
    try:
        model = checkpoint.load_model(args.model, distributed.resolve_device(args.device))
        tokenizer = gpt2_tokenizer(args.model)
    except checkpoint.CheckpointError as exc:
        raise SystemExit(
            f"error: cannot load {args.model}: {exc}. The instruct-finetune stage writes models/instruct: restore it "
            "with `dvc checkout --force models/instruct`, or make it again with `dvc repro instruct-finetune`"
        ) from exc
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: cannot load {args.model}: {exc}") from exc
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k}

    def answer(instruction: str, input_text: str) -> None:
        for piece in stream_response(model, tokenizer, instruction, input_text, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    if args.once is not None:
        answer(args.once, args.input)
        return
    interactive = sys.stdin.isatty()
    prompt_out = sys.stderr if interactive else _Null()
    while True:
        instruction = _read_block(sys.stdin, "### Instruction (empty line to finish):\n", prompt_out)
        if instruction is None:
            return
        input_text = _read_block(sys.stdin, "### Input (optional, empty line to finish):\n", prompt_out) or ""
        if instruction.strip():
            answer(instruction, input_text)


class _Null:
    def write(self, _: str) -> None: ...

    def flush(self) -> None: ...


if __name__ == "__main__":
    main()
