"""The README, ``docs/*.md`` and the modules' docstrings point only to files that exist: markdown links
(relative to the page) and file paths written in the text (``conf/vision/train.yaml``,
``docs/routers.md``; relative to the repository, the page or the module's package)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "vision", "recsys", "multimodal", "nlp", "hydra_plugins")
# where runs and tools write (.gitignore): a path there names an output, not a file of the repository,
# whether or not a run has made the folder here
OUTPUT_DIRS = {"multirun", "outputs", "bench_results"}
TOP = sorted(p.name for p in REPO.iterdir() if not p.name.startswith(".") and p.name not in OUTPUT_DIRS)
EXTENSIONS = "md|py|yaml|yml|json|toml|txt|cfg|png|svg|csv"
# a path written in prose: folders then a file name with a known extension, or a bare *.md name
PATH = re.compile(rf"(?<![\w./<>{{}}*$~-])((?:[\w.-]+/)*[\w.-]+\.(?:{EXTENSIONS}))(?![\w/*<>{{}}-])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# files a run or a tool writes (named as outputs, not as files of the repository)
WRITTEN = {"compare.md", "summary.md", "compare.csv", "metrics.json", "history.jsonl", "config.yaml",
           "analysis.json", "train.log", "model.pt", "config.json"}


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text(), str(path))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n".join(doc for n in nodes if (doc := ast.get_docstring(n, clean=False)))


def _modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]


def _exists(ref: str, where: Path) -> bool:
    ref = ref.split("#")[0]
    bases = [REPO, where.parent, *(p for p in where.parents if p != REPO and REPO in p.parents)]
    return not ref or any((base / ref).exists() for base in bases) or (REPO / "docs" / ref).exists()


def _checked(ref: str) -> bool:
    """Whether ``ref`` names a file of the repository: a path under one of its top-level folders or files,
    or a bare documentation page (``*.md``); not a run's output file, a URL or a placeholder."""
    if ref in WRITTEN or "://" in ref:
        return False
    first = ref.split("/")[0]
    return first in TOP if "/" in ref else ref.endswith(".md")


def broken_references(text: str, where: Path) -> list[str]:
    text = re.sub(r"(?<=\S)\s+>\s*\S+", " ", text)  # a shell command's output file (``cmd > table.md``)
    refs = [link for link in LINK.findall(text) if "://" not in link and not link.startswith(("#", "mailto:"))]
    refs += [m for m in PATH.findall(text) if _checked(m)]
    return sorted({ref for ref in refs if not _exists(ref, where)})


def test_the_scanner_finds_what_it_should():
    text = "See [the study](docs/nothing.md), `conf/router/topk.yaml`, conf/router/nothing.yaml, ROUTERS.md §2, " \
           "<run>/metrics.json, compare.md, https://example.org/a.md, conf/router/<name>.yaml and `make > log.md`."
    assert broken_references(text, REPO / "README.md") == ["ROUTERS.md", "conf/router/nothing.yaml", "docs/nothing.md"]


def test_paths_under_run_output_folders_are_not_checked():
    """``multirun/router_study/settings.md`` on a generated page is a run's output: it is not checked,
    also where a study has made ``multirun/`` (the check used to fail there and pass in a fresh clone)."""
    for folder in sorted(OUTPUT_DIRS):
        assert broken_references(f"see {folder}/study/settings.md", REPO / "README.md") == []


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_the_pages_link_to_files_that_exist(page):
    broken = broken_references(page.read_text(), page)
    assert not broken, f"{page.name} points to missing files: {broken}"


def test_the_docstrings_name_files_that_exist():
    broken = {str(p.relative_to(REPO)): refs for p in _modules() if (refs := broken_references(_docstrings(p), p))}
    assert not broken, f"docstrings naming files that are not in the repository: {broken}"


def test_the_config_comments_name_files_that_exist():
    files = sorted((REPO / "conf").rglob("*.yaml")) + sorted((REPO / "requirements").glob("*.txt")) + [REPO / "Makefile"]
    broken = {}
    for path in files:
        comments = "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
        if refs := broken_references(comments, path):
            broken[str(path.relative_to(REPO))] = refs
    assert not broken, f"comments naming files that are not in the repository: {broken}"
