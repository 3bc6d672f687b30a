"""The evaluate stage's Markdown report (reports/eval.md): numbers in tables, plots, responses beside references.

Plain string building, no templating library: `render_eval_report` takes what the stage computed and
returns the page. Text from the data (instructions, references, responses, judge replies) is escaped
for table cells, so a `|`, a newline or HTML in a response cannot break the layout.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from scratchgpt.pipeline.judge import OPTIONS

CELL_CHARS = 300
"""Longest text shown in a table cell (the whole text is in eval_scores.json)."""
UNPARSEABLE_SHOWN = 10
"""Unparseable judge replies quoted in the report."""
BOOK_SCORE = 49.45
"""The book's average Llama 3 8B score for gpt2-medium after 2 epochs of instruction fine-tuning."""


def render_eval_report(
    *,
    metrics: Mapping[str, Any],
    headlines: Sequence[tuple[Any, float | None]],
    classes: Mapping[str, Mapping[str, float]] | None = None,
    confusion: str | None = None,
    judge_options: Mapping[str, Any] = OPTIONS,
    problems: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    plots: Sequence[tuple[str, str | None, str]],
    base: Mapping[str, Any] | None,
    model_parameters: int,
    context_length: int,
    judge: str | None,
    shown: int,
    files: Mapping[str, str | os.PathLike[str]],
) -> str:
    """The whole report as Markdown (`classes`: the classifier's per-class test numbers, shown with the
    `confusion` matrix's link when given)."""
    test = metrics["test"]
    judged = metrics.get("judge")
    out = [
        "# Evaluation of the instruction-following model",
        "",
        f"Written by the `evaluate` stage (`dvc repro evaluate`) from `{_path(files['model'])}` "
        f"({model_parameters:,} parameters, context {context_length} tokens) and its {test['examples']} "
        f"test responses in `{_path(files['responses'])}`. Judge: "
        + (f"{judge}." if judge else "none (`evaluate.judge: none`): exact match and ROUGE-L only."),
        "",
        "## What to expect from this model",
        "",
        _expectations(base, model_parameters, examples, test),
        "",
        "## Headline numbers",
        "",
        "| stage | number | value |",
        "|---|---|---|",
        *[f"| {h.stage} | {h.label} | {_headline(h.key, v)} |" for h, v in headlines],
        f"| evaluate | test response loss (response tokens only) | {test['response_loss']:.3f} |",
        f"| evaluate | test response perplexity | {test['response_perplexity']:.1f} |",
        f"| evaluate | exact match | {round(test['exact_match'] * test['examples'])} of {test['examples']} "
        f"({test['exact_match']:.1%}) |",
        f"| evaluate | ROUGE-L F1, mean | {test['rouge_l']:.3f} |",
        f"| evaluate | judge score, mean of 0–100 | {_judge_headline(judged)} |",
    ]
    if problems:
        out += ["", "Not available:", *[f"- {p}" for p in problems]]
    if classes:
        out += _classes_section(classes, confusion)
    out += _responses_section(test, examples)
    if judged is not None:
        out += _judge_section(judge, judged, examples, files["scores"], judge_options)
    out += _plots_section(plots)
    out += _examples_sections(examples, shown, judged_by_llm=bool(judged and judged.get("judged")))
    out += _method_section(files)
    return "\n".join(out) + "\n"


def _expectations(base: Mapping[str, Any] | None, parameters: int, examples: Sequence[Mapping[str, Any]],
                  test: Mapping[str, Any]) -> str:  # fmt: skip
    counts = Counter(" ".join(str(e["model_response"]).split()) for e in examples)
    common, times = counts.most_common(1)[0]
    spread = (
        f"{test['distinct_responses']} of its {test['examples']} responses are distinct; the most common one, "
        f"{_quote(common)}, answers {times} instructions."
    )
    kind = (base or {}).get("kind")
    if kind == "pretrain":
        return (
            f"The base is this pipeline's own model (`load_gpt2.base: pretrain`): {parameters:,} parameters "
            "pretrained on the pipeline's small corpus (on the CPU preset, one short story of 5,145 tokens), "
            "then fine-tuned on the instruction data. It has seen almost no English and no facts, so it cannot "
            "answer the instructions: fine-tuning teaches it the shape of an answer and the commonest words of "
            f"the training answers. {spread} ROUGE-L credit comes mostly from such shared words, and the loss "
            "measures how well it predicts the reference answers, not how well it would write them. Read these "
            "numbers as a check that the pipeline works end to end, not as instruction following. For the "
            f"book's result (OpenAI's gpt2-medium; average Llama 3 8B judge score {BOOK_SCORE}), run the book "
            "preset with `load_gpt2.base=gpt2-medium` and `evaluate.judge=ollama`."
        )
    if kind == "official":
        name = base.get("name", "GPT-2") if base else "GPT-2"
        return (
            f"The base is OpenAI's {name} ({parameters:,} parameters), fine-tuned on the instruction data. "
            f"{spread} For comparison, the book reports an average Llama 3 8B judge score of {BOOK_SCORE} for "
            "gpt2-medium after 2 epochs of full fine-tuning, with the same judge prompt and options."
        )
    where = ", ".join(f"{k} {v}" for k, v in (base or {}).items() if k in ("kind", "name", "path", "url"))
    return f"Base: {where or 'not recorded in the model config'}. {spread}"


def _classes_section(classes: Mapping[str, Mapping[str, float]], confusion: str | None) -> list[str]:
    lines = ["", "## Classifier, per class (test split)", "", "| class | precision | recall | F1 | texts |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, m in classes.items():
        lines.append(f"| {_cell(name)} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                     f"{int(m['support'])} |")  # fmt: skip
    if confusion:
        lines += ["", f"![Classifier confusion matrix (test)]({confusion})"]
    return lines


def _responses_section(test: Mapping[str, Any], examples: Sequence[Mapping[str, Any]]) -> list[str]:
    words = lambda key: sum(len(str(e[key]).split()) for e in examples) / max(len(examples), 1)  # noqa: E731
    lines = [
        "",
        "## Test responses",
        "",
        "| | |",
        "|---|---|",
        f"| responses | {test['examples']} |",
        f"| distinct responses (after whitespace normalization) | {test['distinct_responses']} |",
        f"| empty responses | {test['empty_responses']} |",
        f"| mean length in words: response / reference | {words('model_response'):.1f} / {words('output'):.1f} |",
        f"| examples longer than the model's context, cut for the loss | {test['truncated_examples']} |",
    ]
    if test["loss_examples"] < test["examples"]:
        lines.append(f"| examples in the loss (the others' prompts fill the context) | {test['loss_examples']} |")
    lines.append(f"| response tokens the loss averages over | {test['loss_tokens']} |")
    return lines


def _judge_section(judge: str | None, judged: Mapping[str, Any], examples: Sequence[Mapping[str, Any]],
                   scores: str | os.PathLike[str], judge_options: Mapping[str, Any]) -> list[str]:  # fmt: skip
    options = ", ".join(f"{k} {v}" for k, v in judge_options.items())
    lines = [
        "",
        "## Judge",
        "",
        f"{judge}, asked the book's prompt for each response (options: {options}; one non-streaming message).",
        "",
        "| | |",
        "|---|---|",
        f"| scored | {judged['judged']} |",
        f"| replies that are not an integer 0–100 (left out of the mean) | {judged['unparseable']} |",
        f"| requests that failed after every retry (left out of the mean) | {judged['failed']} |",
        f"| mean score | {_judge_headline(judged)} |",
    ]
    bad = [e for e in examples if e.get("judge_status") == "unparseable"]
    if bad:
        lines += ["", "Replies that are not a score:", ""]
        lines += [f"- #{e['index']}: {_quote(_clip(str(e['judge_reply'])))}" for e in bad[:UNPARSEABLE_SHOWN]]
        if len(bad) > UNPARSEABLE_SHOWN:
            lines.append(f"- … and {len(bad) - UNPARSEABLE_SHOWN} more (`{_path(scores)}`)")
    failed = [e for e in examples if e.get("judge_status") == "failed"]
    if failed:
        lines += ["", "Failed requests: " + ", ".join(f"#{e['index']} ({e['judge_error']})" for e in failed[:10])]
    return lines


def _plots_section(plots: Sequence[tuple[str, str | None, str]]) -> list[str]:
    lines = ["", "## Training curves", ""]
    for title, link, producer in plots:
        if link is None:
            lines += [f"*{title}: no plot yet (run `dvc repro {producer}`).*", ""]
        else:
            lines += [f"![{title}]({link})", ""]
    return lines[:-1]


def _examples_sections(examples: Sequence[Mapping[str, Any]], shown: int, *, judged_by_llm: bool) -> list[str]:
    if shown == 0 or not examples:
        return []
    if judged_by_llm:
        scored = [e for e in examples if e.get("judge_score") is not None]
        key, by = (lambda e: e["judge_score"]), "judge score"
    else:
        scored, key, by = list(examples), (lambda e: e["rouge_l"]), "ROUGE-L"
    best = sorted(scored, key=lambda e: (-key(e), e["index"]))[:shown]
    worst = sorted(scored, key=lambda e: (key(e), e["index"]))[:shown]
    lines = ["", "## Responses beside their references", "", f"The first {min(shown, len(examples))} test examples:"]
    lines += _table(examples[:shown], judged_by_llm)
    lines += ["", f"### Best {len(best)} by {by}", *_table(best, judged_by_llm)]
    lines += ["", f"### Worst {len(worst)} by {by}", *_table(worst, judged_by_llm)]
    return lines


def _table(rows: Sequence[Mapping[str, Any]], judged: bool) -> list[str]:
    head = "| # | instruction (input) | reference | response | ROUGE-L |" + (" judge |" if judged else "")
    sep = "|---|---|---|---|---|" + ("---|" if judged else "")
    lines = ["", head, sep]
    for e in rows:
        task = _cell(e["instruction"]) + (f"<br>*Input:* {_cell(e['input'])}" if e["input"] else "")
        response = _cell(e["model_response"]) if e["model_response"].strip() else "*(empty)*"
        row = f"| {e['index']} | {task} | {_cell(e['output'])} | {response} | {e['rouge_l']:.2f} |"
        if judged:
            score = e.get("judge_score")
            row += f" {score if score is not None else e.get('judge_status', '—')} |"
        lines.append(row)
    return lines


def _method_section(files: Mapping[str, str | os.PathLike[str]]) -> list[str]:
    return [
        "",
        "## How the numbers are computed",
        "",
        f"- **Response loss**: the cross-entropy of `{_path(files['model'])}` on the test split "
        f"(`{_path(files['test'])}`) with the prompt's targets masked, so only the reference response and "
        "the end-of-text after it count (the book's collate with `mask_prompt`); examples are cut to the "
        "model's context. The mean is over every response token of the test split, so it does not depend on "
        "the batch size. Perplexity is its exponential.",
        "- **Exact match**: the response equals the reference after stripping and collapsing whitespace "
        "(case and punctuation count).",
        "- **ROUGE-L**: the F-measure of the longest common subsequence of words (`rouge-score`, "
        "`RougeScorer(['rougeL'], use_stemmer=True)`: lower-cased, Porter-stemmed, punctuation dropped), "
        "averaged over the test examples; an empty response scores 0.",
        "- **Judge score**: the book's prompt (*Given the input … score the model response … on a scale from 0 "
        "to 100 … Respond with the integer number only.*); a reply that is not an integer from 0 to 100 is "
        "counted, not scored. The mean is over the scored responses.",
        "- The other stages' numbers are copied from their `metrics/*.json` files. The instruct-finetune "
        "stage's train and validation losses count the prompt's tokens too unless it trained with "
        "`mask_prompt: true`, so they are not comparable with the response loss.",
        f"- The per-example scores (and the judge's replies) are in `{_path(files['scores'])}`.",
    ]


def _headline(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if key.endswith("accuracy"):
        return f"{value:.1%}"
    if key.endswith("perplexity"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _judge_headline(judged: Mapping[str, Any] | None) -> str:
    if judged is None:
        return "— (no judge)"
    if "mean_score" not in judged:
        return "— (nothing scored)"
    return f"{judged['mean_score']:.2f} ({judged['judged']} scored)"


def _clip(text: str, limit: int = CELL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _cell(text: str) -> str:
    """`text` safe inside a Markdown table cell: clipped, HTML-escaped, pipes and newlines replaced."""
    text = html.escape(_clip(text.strip()), quote=False)
    for char in "\\`*_[]":
        text = text.replace(char, f"\\{char}")
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _quote(text: str) -> str:
    return f"“{_cell(text)}”" if text else "*(empty)*"


def _path(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)
