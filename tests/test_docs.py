"""The documentation holds together: every relative link of README.md and docs/*.md resolves (the file, and the
#anchor by GitHub's heading slugs), every config key is in the generated reference (docs/configuration.md), and
no tracked text file numbers the project's own history (rounds of work, tracker numbers): commands, files and
dates say where a figure comes from."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INDENTED = re.compile(r"^(?: {4}|\t).*$", re.M)  # indented code blocks
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced, indented and inline code (links there are not links)."""
    return _CODE_SPAN.sub("", _INDENTED.sub("", _FENCE.sub("", text)))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed (letters, digits, spaces,
    '-' and '_' kept), each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = _FENCE.sub("", path.read_text())
    for _, title in _HEADING.findall(text):
        slug = github_slug(title)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")  # repeated headings get -1, -2, ...
    return out


def test_github_slug_rules():
    assert github_slug("Memory plan (`fishds plan`)") == "memory-plan-fishds-plan"
    assert github_slug("What a run writes (`output_dir`)") == "what-a-run-writes-output_dir"
    assert github_slug("Selection rules: score x (x control)") == "selection-rules-score-x-x-control"
    assert github_slug("Does FISH help? (`bench/compare.py`)") == "does-fish-help-benchcomparepy"
    assert github_slug("Keep ratios 50% and 12.5%") == "keep-ratios-50-and-125"


def test_every_relative_link_resolves():
    assert len(PAGES) > 10, "docs/ pages are missing"
    broken, checked = [], 0
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = page if not file_part else (page.parent / file_part).resolve()
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert checked > 30
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short_and_indexes_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README.md's docs index lacks docs/{page.name}"


def test_every_config_key_is_in_the_reference():
    from pydantic import BaseModel

    from fishds.config import Config

    page = (ROOT / "docs" / "configuration.md").read_text()
    keys = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, prefix + name + ".")
            else:
                keys.append(prefix + name)

    walk(Config, "")
    assert len(keys) > 50
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert not missing, f"keys missing from docs/configuration.md (regenerate it): {missing}"
    assert "PydanticUndefined" not in page


# the project's own history, numbered: written so that this file does not match itself
_HISTORY = re.compile(r"(?<![-\w])(?:sessions?[ -][0-9]|issues?[ -]?#?[0-9]|issue #|rounds? [0-9]|issue's)", re.I)


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        binary = path.suffix in {".png", ".gz", ".pt", ".safetensors"}
        if name and path.is_file() and not binary and path != Path(__file__).resolve():  # this file names them
            files.append(path)
    return files


def test_history_pattern_catches_what_it_should():
    for text in ("session 2", "Issue 12's", "issue #7", "round 3", "issue-13", "sessions 2 and 3"):
        assert _HISTORY.search(text), text
    for text in ("3 rounds for float keys", "a known issue", "the session's config", "--rounds 2"):
        assert not _HISTORY.search(text), text


def test_no_tracked_file_numbers_its_own_history():
    hits = []
    for path in _tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if _HISTORY.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "name commands, files and dates instead:\n" + "\n".join(hits)
