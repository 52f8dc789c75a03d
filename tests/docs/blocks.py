"""The fenced code blocks of README.md and docs/*.md, and the tags that say how each one runs.

Every block is labelled with its language: ``python`` blocks run in a fresh
interpreter (test_python_blocks.py); ``bash``, ``console``, ``sh`` and ``shell``
blocks run through bash (test_shell_blocks.py); ``text`` marks what is not code
(output, diagrams, synopses). A block with any other label, or none, fails.

A block runs in a fresh empty directory unless a tag, an HTML comment on the
line right above its fence (invisible on the rendered page), says otherwise::

    <!-- snippet: MODE[; OLD => NEW]... -->

MODE is one of

- ``local``: the default (a tag is only needed for substitutions);
- ``checkout``: in a temporary copy of the checkout (``pip install .``, paths
  such as ``docker/compose.yaml``);
- ``docker``: in a copy of the checkout under the ``docker`` marker, with a
  compose project and image tags of its own, all removed afterwards; skipped,
  with the reason, where no Docker engine answers;
- ``not-run: REASON``: never run; the reason is listed at the end of every test
  run, and the blocks so tagged are counted there.

Each ``OLD => NEW`` replaces text before the block runs, for what only makes
sense on a real deployment (a host name, a port, ``/var/lib/...``). NEW may
use ``{port}`` (a free TCP port) and ``{project}`` (a unique compose project
name). A substitution that matches nothing fails the test, so tags cannot go
stale silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = frozenset({"python"})
SHELL = frozenset({"bash", "console", "sh", "shell"})
TEXT = frozenset({"text"})
MODES = frozenset({"local", "checkout", "docker", "not-run"})

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^`\s]*)\s*$")
TAG = re.compile(r"^[ \t]*<!-- snippet: (?P<body>.*?) -->[ \t]*$")
COMMENT = re.compile(r"^[ \t]*<!--.*-->[ \t]*$")


@dataclass(frozen=True)
class Block:
    """One fenced block, its tag, and what is wrong with the tag (if anything)."""

    path: str  # relative to the checkout
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mode: str = "local"
    reason: str = ""
    subs: tuple[tuple[str, str], ...] = ()
    problems: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_tag(body: str) -> tuple[str, str, tuple[tuple[str, str], ...], list[str]]:
    """Split a tag's body into mode, reason, substitutions and problems."""
    head, *items = body.split(";")
    mode, _, reason = head.partition(":")
    mode, reason = mode.strip(), reason.strip()
    problems = []
    if mode == "not-run":
        if not reason:
            problems.append("a not-run tag needs a reason: <!-- snippet: not-run: WHY -->")
        return mode, ";".join([reason, *items]).strip(), (), problems
    if mode not in MODES or reason:
        problems.append(
            f"unknown snippet mode {head.strip()!r} (known: {', '.join(sorted(MODES))})"
        )
    subs = []
    for item in items:
        old, arrow, new = item.partition("=>")
        if not arrow or not old.strip():
            problems.append(f"bad substitution {item.strip()!r}: write OLD => NEW")
        else:
            subs.append((old.strip(), new.strip()))
    return mode, "", tuple(subs), problems


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The blocks of one page, and the tags that stand anywhere but right above a fence."""
    rel = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    blocks, stray = [], []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            if TAG.match(lines[i]) and not _tag_above_fence(lines, i):
                stray.append(f"{rel}:{i + 1}: a snippet tag must stand right above a fence")
            i += 1
            continue
        indent = len(opening["indent"])
        end = i + 1
        while end < len(lines) and not re.match(r"^[ \t]*```\s*$", lines[end]):
            end += 1
        code = "".join(line[indent:] + "\n" for line in lines[i + 1 : end])
        mode, reason = "local", ""
        subs: tuple[tuple[str, str], ...] = ()
        problems: list[str] = []
        j = i - 1
        while j >= 0 and COMMENT.match(lines[j]):
            tag = TAG.match(lines[j])
            if tag:
                mode, reason, subs, problems = parse_tag(tag["body"])
            j -= 1
        blocks.append(Block(rel, i + 1, opening["lang"], code, mode, reason, subs, tuple(problems)))
        i = end + 1
    return blocks, stray


def _tag_above_fence(lines: list[str], i: int) -> bool:
    j = i + 1
    while j < len(lines) and COMMENT.match(lines[j]):
        j += 1
    return j < len(lines) and FENCE.match(lines[j]) is not None


def all_blocks() -> list[Block]:
    """Every fenced block of README.md and docs/, in page order."""
    return [block for path in doc_files() for block in parse(path)[0]]


def stray_tags() -> list[str]:
    """Tags that apply to no block (not right above an opening fence)."""
    return [problem for path in doc_files() for problem in parse(path)[1]]


def substitute(block: Block, values: dict[str, str]) -> str:
    """The block's code with its tag's substitutions made; raise if one matches nothing."""
    code = block.code
    for old, new in block.subs:
        if old not in code:
            raise AssertionError(f"{block.id}: substitution {old!r} matches nothing")
        code = code.replace(old, new.format(**values))
    return code
