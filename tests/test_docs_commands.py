"""Every command the README and docs show runs as written, as far as it needs no GPU, model
download or hour of training.

Each shell command in a code block of README.md and docs/*.md is checked by what it is:
- `idselect flops` / `idselect capacity`: run, and must exit 0;
- `idselect serve ...`: its command line goes through `idselect serve`'s own parsing (every
  flag, the environment and the start-up checks that need no engine);
- `python -m PACKAGE.MODULE ...`: the module exists and its `--help` lists every flag used;
- `make TARGET`: the Makefile has the target (`make -n`).
Commands for other tools (docker, helm, curl, the device tool) are checked elsewhere
(tests/test_deploy_static.py) or not at all.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_SHELL = ("", "bash", "sh", "shell", "console")  # fenced blocks whose lines are commands


def shell_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks tagged as shell (or untagged)."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*([\w-]*)\s*$", line)
        if fence and lang is None:
            lang, lines = fence.group(1), []
        elif fence and not fence.group(1):
            if lang in _SHELL:
                blocks.append("\n".join(lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, "an unclosed code fence"
    return blocks


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every idselect / python -m / make command in a code block."""
    found = []
    for doc in DOCS:
        for block in shell_blocks(doc.read_text()):
            pending = ""  # a command whose quoted argument spans lines (curl -d '{...}')
            for line in block.replace("\\\n", " ").splitlines():
                line = pending + re.sub(r"\s+#.*$", "", line).strip()  # trailing comment
                if not line or line.startswith("#"):
                    continue
                try:
                    argv = shlex.split(line)
                except ValueError:  # an open quote: the command goes on on the next line
                    pending = line + "\n"
                    continue
                pending = ""
                if argv[0].startswith(".venv/bin/"):
                    argv[0] = argv[0].removeprefix(".venv/bin/")
                if argv[0] in ("idselect", "make") or argv[:2] == ["python", "-m"]:
                    found.append((doc.name, argv))
            assert not pending, f"{doc.name}: unclosed quote in {pending!r}"
    return found


_KINDS = {  # kind -> (is it this kind, what of the command line the check takes)
    "run": (lambda a: a[0] == "idselect" and a[1] in ("flops", "capacity"), lambda a: a),
    "serve": (lambda a: a[:2] == ["idselect", "serve"], lambda a: a[2:]),
    "module": (lambda a: a[:2] == ["python", "-m"], lambda a: a[2:]),
    "make": (lambda a: a[0] == "make", lambda a: a[1:]),
}


def _by_kind(kind: str) -> list[list[str]]:
    matches, part = _KINDS[kind]
    return [part(argv) for _, argv in commands() if matches(argv)]


def test_the_docs_show_commands_of_every_kind():
    assert all(_by_kind(k) for k in ("run", "serve", "module", "make"))


@pytest.mark.parametrize("argv", _by_kind("run"), ids=" ".join)
def test_idselect_commands_run(argv):
    done = subprocess.run([sys.executable, "-m", "server.cli", *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "budget" in done.stdout.lower(), done.stdout[-500:]  # its table


def test_serve_command_lines_parse():
    code = ("import json, sys; from server.serve import parse_args\n"
            "for argv in json.loads(sys.argv[1]):\n    parse_args(argv)\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(_by_kind("serve"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("argv", _by_kind("module"), ids=" ".join)
def test_python_modules_take_the_flags_shown(argv):
    module, args = argv[0], argv[1:]
    if module == "devtools.vllm_releases" and args[:1] == ["run"]:
        args = args[: args.index("--")] if "--" in args else args  # the wrapped command aside
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    flags = [a.split("=")[0] for a in args if a.startswith("--") and " " not in a]
    missing = [f for f in flags if f not in done.stdout]
    assert not missing, (module, missing)


def test_make_targets_exist():
    for argv in _by_kind("make"):
        target = [a for a in argv if "=" not in a][0]
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, (target, done.stderr[-500:])


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def test_relative_links_point_inside_the_repository_at_files_that_exist():
    broken = []
    for doc in DOCS:
        for target in _LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve()
            if not (path.is_relative_to(ROOT) and path.exists()):
                broken.append((doc.name, target))
    assert not broken, broken
