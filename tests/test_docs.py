"""README.md and docs/ stay true: every repository file they cite exists, every link resolves, and README names every
task and every config group with its options (so a new task, group or option cannot go undocumented)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from storyexp import CONFIG_DIR
from storyexp.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# top-level folders of this repository: a backticked path starting with one of them is a citation of a file here
TOP = ("storyexp/", "tests/", "scripts/", "benchmarks/", "docs/", "sweeps/", "hydra_plugins/", ".ci/")
PLACEHOLDER = re.compile(r"[<>{}*\[\]|$]|\.\.\.")


def _ignored() -> set[str]:
    """Plain paths of .gitignore (a user's own files that README names, e.g. storyexp/conf/local/default.yaml)."""
    lines = (REPO / ".gitignore").read_text().splitlines()
    return {ln.strip().lstrip("/") for ln in lines if ln.strip() and not ln.startswith("#") and "*" not in ln}


def _cited_paths(text: str) -> set[str]:
    paths = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,;:)")
        if token.startswith(TOP) and not PLACEHOLDER.search(token):
            paths.add(token.split("::")[0])
    return paths


def _links(text: str) -> set[str]:
    return {t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://", "mailto:"))}


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_repository_file_exists(doc):
    missing = sorted(p for p in _cited_paths(doc.read_text()) - _ignored() if not (REPO / p).exists())
    assert not missing, f"{doc.relative_to(REPO)} cites files that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(doc):
    broken = []
    for link in _links(doc.read_text()):
        target, _, anchor = link.partition("#")
        file = (doc.parent / target).resolve() if target else doc
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(link)
    assert not broken, f"{doc.relative_to(REPO)} has broken links: {sorted(broken)}"


def test_readme_names_every_task_and_every_config_group_option():
    readme = (REPO / "README.md").read_text()
    assert not [t for t in TASKS if f"`{t}`" not in readme], "a task is missing from README's task table"
    missing = []
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if not options:  # conf/local: the user's own (git-ignored) file
            continue
        if f"`{group.name}`" not in readme:
            missing.append(group.name)
        missing += [f"{group.name}={o}" for o in options if f"`{o}`" not in readme]
    assert not missing, f"README's config-group table lacks: {missing}"


def test_readme_shows_the_demo_picture_and_the_two_set_up_commands():
    readme = (REPO / "README.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert pictures and all((REPO / p).is_file() for p in pictures)
    assert "bash scripts/setup.sh" in readme and "python -m pytest" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/setup.sh" in ci and "pytest" in ci  # CI runs README's test command
