"""The documentation holds together: README.md and docs/*.md link to files and headings that exist, the
README stays short, and every command, module and script they name is there on disk.

Everything is read from the files; nothing is imported, so a module the docs name is checked by its path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(``?)(.+?)\1", re.S)
MODULE_COMMAND = re.compile(r"python -m (scratchgpt(?:\.\w+)+)")
STAGE_SCRIPT = re.compile(r"(?<![\w/])stages/(\w+)\.py\b")
DOTTED_NAME = re.compile(r"scratchgpt(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"(?:src|stages|tests|bench|flows|presets|scripts|requirements|docs|\.ci)/[\w./-]*")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def prose(text: str) -> str:
    """The text without its fenced code blocks (their lines are blanked, so line counts stay)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def code_spans(text: str) -> list[str]:
    """The contents of the inline code spans outside fenced blocks (a span may run over a line break)."""
    return [m.group(2).strip() for m in CODE_SPAN.finditer(prose(text))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation and symbols dropped (letters,
    digits, `_`, `-` and spaces stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(text: str) -> list[str]:
    """Link targets outside code that point into the repository (no scheme, no `//`)."""
    bare = CODE_SPAN.sub("", prose(text))
    targets = [m.group(1) for m in LINK.finditer(bare)]
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//", t)]


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            problems.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {rel(dest)}")
    return problems


def module_file(module: str) -> Path | None:
    """The file `python -m MODULE` runs, from the path on disk: MODULE.py or MODULE/__main__.py under src/."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(source: str, name: str) -> bool:
    """Whether module source defines NAME at its top level or imports it."""
    n = re.escape(name)
    if re.search(rf"^(?:async\s+def|def|class)\s+{n}\b|^{n}\s*(?::[^=\n]*)?=", source, re.M):
        return True
    imports = re.findall(r"^(?:from\s+\S+\s+)?import\s+(\([^)]*\)|.*)$", source, re.M)
    return any(re.search(rf"\b{n}\b", names) for names in imports)


def unresolved_name(dotted: str) -> str | None:
    """Why `scratchgpt.a.b.c` does not name a module, package or top-level name under src/ (None if it does):
    the longest prefix that is a module or package must exist and define the next part, if any."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = SRC.joinpath(*parts[:i])
        source_file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source_file.is_file():
            if i == len(parts):
                return None
            name = parts[i]
            if defines(source_file.read_text(encoding="utf-8"), name):
                return None
            return f"{dotted}: {rel(source_file)} defines no {name}"
    return f"{dotted}: no module {parts[0]} under src/"


# --- the checker itself: each check can fail ----------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Quickstart", "quickstart"),
        ("Data: download → tokenize → sample-to-parquet", "data-download--tokenize--sample-to-parquet"),
        ("Several GPUs, several nodes (`torchrun`)", "several-gpus-several-nodes-torchrun"),
        ("Models in MLflow's registry", "models-in-mlflows-registry"),
        ("Data parallel: `train.nproc` and `torchrun`", "data-parallel-trainnproc-and-torchrun"),
        ("The `run_<stage>()` functions", "the-run_stage-functions"),
        ("See [the README](../README.md) *now*", "see-the-readme-now"),
    ],
)
def test_slug_follows_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_the_checks_catch_what_they_are_for(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A heading\n\n## A heading\n\n```\n# not a heading\n```\n")
    page.write_text(
        "# Page\n\n[ok](other.md#a-heading) [ok](other.md#a-heading-1) [ok](#page) [web](https://example.com)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [code only](other.md#not-a-heading) [self](#nope)\n"
        "`[in code](missing-too.md)`\n\n```\n[in a block](missing-three.md)\n```\n",
        encoding="utf-8",
    )
    assert [p.split(":")[0] for p in broken_links(page)] == [
        "missing.md",
        "other.md#nope",
        "other.md#not-a-heading",
        "#nope",
    ]
    assert module_file("scratchgpt.no_such_module") is None
    assert unresolved_name("scratchgpt.no_such_group.module") is not None
    assert unresolved_name("scratchgpt") is None
    assert MODULE_COMMAND.findall("run `python -m scratchgpt.x.y --help` or python -m scratchgpt.*") == [
        "scratchgpt.x.y"
    ]
    assert STAGE_SCRIPT.findall("python stages/pretrain.py, stages/<stage>.py, bench/stages/x.py") == ["pretrain"]


# --- the docs ---------------------------------------------------------------------------------------


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def test_there_are_docs_pages_and_the_readme_links_each():
    assert DOCS, "no docs/*.md"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README.read_text("utf-8"))}
    unlinked = [rel(p) for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"README.md links no {unlinked}"


@pytest.mark.parametrize("page", DOCS, ids=rel)
def test_docs_page_opens_with_a_title_a_summary_and_the_way_back(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 3 and lines[0].startswith("# ") and not lines[1].strip(), "# Title, blank line, summary"
    assert lines[2].strip() and "](../README.md)" in lines[2], "a one-line summary with a link back to the README"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    problems = broken_links(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_python_m_commands_name_modules_that_exist(page):
    modules = sorted(set(MODULE_COMMAND.findall(page.read_text(encoding="utf-8"))))
    missing = [
        f"python -m {m}: no {m.replace('.', '/')}.py or __main__.py under src/" for m in modules if not module_file(m)
    ]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_stage_scripts_exist(page):
    names = sorted(set(STAGE_SCRIPT.findall(page.read_text(encoding="utf-8"))))
    missing = [f"stages/{n}.py" for n in names if not (REPO / "stages" / f"{n}.py").is_file()]
    assert not missing, f"no such stage script: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_modules_and_their_names_exist(page):
    """`scratchgpt.x.y` (or `scratchgpt.x.y.Name`, `scratchgpt.x.y.f(...)`) in inline code names a module
    or package under src/, and the name after it is defined there."""
    names = set()
    for span in code_spans(page.read_text(encoding="utf-8")):
        m = DOTTED_NAME.fullmatch(re.sub(r"\(.*\)$", "", span))
        if m:
            names.add(m.group(0))
    problems = [why for name in sorted(names) if (why := unresolved_name(name))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_repository_paths_exist(page):
    """A repository path in inline code (`src/...`, `tests/...`, `bench/...`, ...) exists, unless it is a
    pattern (`<stage>`, `*`, `{a,b}`)."""
    paths = {s for s in code_spans(page.read_text(encoding="utf-8")) if REPO_PATH.fullmatch(s)}
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"no such path: {missing}"
