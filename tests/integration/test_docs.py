"""Examples in the docs are run by tests: every ```sql block of README.md and docs/*.md.

The convention
--------------
Every fenced block whose info string is ``sql`` is an example that must run. Each Markdown
file gets a migrated database of its own and a running runtime (dispatcher, timer,
executors); its blocks run in the order they appear, each through ``durable-actor psql``
(``-X -v ON_ERROR_STOP=1``), so psql meta-commands such as ``\\gset`` work and a block may
hold several statements. Later blocks of a file see what earlier ones created: a small
set-up block (``CREATE TABLE documents …``) comes before the example that needs it. The
connecting role is a superuser, and ``enable_superuser_instances`` is on in the test
database (as for every test).

HTML comments on the lines just above the fence (blank lines between are allowed) change
what is expected:

``<!-- norun -->`` or ``<!-- norun: why -->``
    the block is not run (an excerpt, a fragment, a statement needing a service the tests
    lack). Say why.
``<!-- output: text -->``
    the block must succeed and ``text`` must occur in psql's output.
``<!-- error: text -->``
    the block must fail, with ``text`` in psql's error output.

Several markers may be stacked. Any other word in a comment right above a ``sql`` fence is
an error, so a misspelt marker cannot silently disable a check. Blocks with another info
string (``sh``, ``json``, ``text`` …) are never run.

The same module checks that README.md's tables and the environment file example name every
setting the code has (and no setting it lacks), and that the README's test command, which
``.ci/run`` runs, is there.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from durable_actor import config
from tests.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("durable-actor")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKERS = ("norun", "output", "error")
BLOCK_TIMEOUT = 90

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_COMMENT = re.compile(r"^\s*<!--\s*(?P<word>[A-Za-z][\w-]*)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int                      # 1-based line of the opening fence
    sql: str
    norun: bool = False
    outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def sql_blocks(text: str, path: Path = Path("<text>")) -> list[Block]:
    """The ```sql blocks of a Markdown text, with the markers written above each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        info = m["info"].split()[0].lower() if m["info"].split() else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if (close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence)
                    and not close["info"]):
                break
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        i += 1
        if info != "sql":
            continue
        block = Block(path, start + 1, "\n".join(body) + "\n")
        _read_markers(lines, start, block)
        blocks.append(block)
    return blocks


def _read_markers(lines: list[str], fence_index: int, block: Block) -> None:
    j = fence_index - 1
    while j >= 0:
        text = lines[j]
        if not text.strip():
            j -= 1
            continue
        m = _COMMENT.match(text)
        if not m:
            return
        word, arg = m["word"].lower(), (m["arg"] or "").strip()
        if word not in MARKERS:
            raise ValueError(f"{block.where}: unknown marker <!-- {m['word']} --> above a sql "
                             f"block; use one of {', '.join(MARKERS)}")
        if word == "norun":
            block.norun = True
        elif not arg:
            raise ValueError(f"{block.where}: <!-- {word}: … --> needs the text to look for")
        elif word == "output":
            block.outputs.append(arg)
        else:
            block.errors.append(arg)
        j -= 1


def run_block(dsn: str, block: Block) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "psql", "--dsn", dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1",
         "-P", "pager=off", "-f", "-"],
        input=block.sql, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, check=False)


def check(block: Block, proc: subprocess.CompletedProcess[str]) -> str | None:
    """What is wrong with this run of `block`, or None."""
    shown = f"\n--- block\n{block.sql}--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    if block.errors:
        if proc.returncode == 0:
            return f"{block.where}: expected an error, the block succeeded{shown}"
        missing = [e for e in block.errors if e not in proc.stderr]
        if missing:
            return f"{block.where}: error output lacks {missing!r}{shown}"
        return None
    if proc.returncode != 0:
        return f"{block.where}: failed (psql exit {proc.returncode}){shown}"
    missing = [o for o in block.outputs if o not in proc.stdout]
    if missing:
        return f"{block.where}: output lacks {missing!r}{shown}"
    return None


# --- the examples --------------------------------------------------------------------------

def _documents_with_sql() -> list[Path]:
    return [p for p in DOCS if p.exists() and sql_blocks(p.read_text(encoding="utf-8"), p)]


@pytest.mark.parametrize("path", _documents_with_sql(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sql_examples_run(path: Path, fresh_dsn: str) -> None:
    blocks = [b for b in sql_blocks(path.read_text(encoding="utf-8"), path) if not b.norun]
    if not blocks:
        pytest.skip("every sql block of this file is marked norun")
    with Runtime(fresh_dsn):
        for block in blocks:
            problem = check(block, run_block(fresh_dsn, block))
            assert problem is None, problem


def test_readme_example_is_run() -> None:
    """The README's example (df.start of the documents workflow) is not marked away."""
    blocks = sql_blocks((ROOT / "README.md").read_text(encoding="utf-8"), ROOT / "README.md")
    run = [b for b in blocks if not b.norun]
    assert any("df.start(" in b.sql and "$batch.*" in b.sql for b in run), blocks
    assert any(b.outputs for b in run), "some README block should check what it printed"


# --- the convention itself (no database) ---------------------------------------------------

SAMPLE = """\
Text.

```sql
SELECT 1;
```

<!-- norun: needs a service -->
```sql
SELECT pg_sleep(1000);
```

<!-- output: 2 -->

<!-- output: two -->
```SQL
SELECT 2, 'two';
```

  <!-- error: division by zero -->
  ```sql
  SELECT 1/0;
  ```

````markdown
```sql
SELECT 'inside another fence, not an example';
```
````

```json
{"not": "sql"}
```
"""


def test_sql_blocks_and_markers() -> None:
    blocks = sql_blocks(SAMPLE)
    assert [(b.line, b.sql, b.norun, b.outputs, b.errors) for b in blocks] == [
        (3, "SELECT 1;\n", False, [], []),
        (8, "SELECT pg_sleep(1000);\n", True, [], []),
        (15, "SELECT 2, 'two';\n", False, ["two", "2"], []),
        (20, "SELECT 1/0;\n", False, [], ["division by zero"]),
    ]


@pytest.mark.parametrize("comment", ["<!-- no-run -->", "<!-- output -->", "<!-- expect: x -->"])
def test_a_misspelt_marker_is_an_error(comment: str) -> None:
    with pytest.raises(ValueError, match=r"marker|needs the text"):
        sql_blocks(f"{comment}\n```sql\nSELECT 1;\n```\n")


def test_other_comments_are_not_markers_elsewhere() -> None:
    text = "<!-- ci: test command -->\n```sh\nmake\n```\n<!-- anything -->\n\nText.\n"
    assert sql_blocks(text) == []


def test_every_doc_parses() -> None:
    for path in DOCS:
        if path.exists():
            sql_blocks(path.read_text(encoding="utf-8"), path)


# --- settings named in the docs match the code ---------------------------------------------

SETTINGS = [f.name for f in dataclasses.fields(config.Settings)]
_ENV = re.compile(r"\bDURABLE_ACTOR_[A-Z0-9_]+\b")
TEST_ONLY = {"DURABLE_ACTOR_TEST_DSN"}


@pytest.mark.parametrize("relative", ["README.md", "docs/operations.md",
                                      "deploy/durable-actor.env.example"])
def test_every_setting_is_documented_and_no_other(relative: str) -> None:
    text = (ROOT / relative).read_text(encoding="utf-8")
    named = set(_ENV.findall(text)) - TEST_ONLY
    known = {config.env_name(name) for name in SETTINGS}
    assert named <= known, f"{relative} names settings the code lacks: {sorted(named - known)}"
    if relative != "docs/operations.md":
        assert known <= named, f"{relative} misses settings: {sorted(known - named)}"


def test_readme_names_every_supervise_flag() -> None:
    from durable_actor.cli import cli

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("supervise", "migrate", "psql"):
        for param in cli.commands[command].params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert f"`{opt}" in text, f"README lacks {command} {opt}"


def test_readme_holds_the_ci_test_command() -> None:
    """.ci/run runs the line of the ```sh block after <!-- ci: test command --> verbatim."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split("<!-- ci: test command -->", 1)
    assert len(after) == 2, "README.md lacks the <!-- ci: test command --> marker"
    block = re.search(r"```\w*\n(.*?)\n```", after[1], re.S)
    assert block is not None
    lines = block[1].splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("python3 -m venv .venv && ")
    assert lines[0].endswith(".venv/bin/pytest")
    assert "DURABLE_ACTOR_TEST_DSN" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
