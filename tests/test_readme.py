"""Every `compress` command in the README parses as written (its verb, options and values exist) and every file it
names from the repository is there. `make readme-check` runs them all for real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cli import app

REPO = Path(__file__).resolve().parents[1]


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def compress_invocations(command: str) -> list[list[str]]:
    """The `compress ...` argument lists in one shell line (`&&` chains and pipes split, redirections dropped)."""
    out = []
    for part in re.split(r"&&|\|", command):
        words = shlex.split(part.split(">")[0])
        if words and words[0] == "compress":
            out.append(words[1:])
    return out


COMMANDS = [args for c in readme_commands((REPO / "README.md").read_text()) for args in compress_invocations(c)]


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 35


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_parses(args):
    command = typer.main.get_command(app)
    rest = list(args)
    while hasattr(command, "commands"):  # a group: `compress`, `compress models`, `compress moe`
        if rest in (["--help"], ["--version"]):
            return
        assert rest and rest[0] in command.commands, f"no verb {rest[:1]} in {sorted(command.commands)}"
        command, rest = command.commands[rest[0]], rest[1:]
    command.make_context(command.name, rest)  # raises on an unknown option, a bad value or a missing argument
    for word in args:
        if word.startswith("examples/"):
            assert (REPO / word).exists(), f"{word} is not in the repository"


def test_the_readme_names_every_registered_choice():
    """The registries are the source of every choice list; the README must not fall behind them."""
    from compress.importance import SCORERS
    from compress.prune import choices as prune_choices
    from compress.quantize import choices as quantize_choices
    from compress.quantize.targets import SUMMARY as TARGETS
    from compress.reparam.passes import PASSES
    from compress.stream.decide import STREAM
    from evals.gate import THRESHOLDS
    from exporters.formats import EXPORT_FORMATS
    from flows.prune import MODES

    text = (REPO / "README.md").read_text()
    names = {
        "quantize --method": list(quantize_choices.METHOD), "quantize --allocator": list(quantize_choices.ALLOCATOR),
        "quantize --measure": list(quantize_choices.MEASURE), "quantize --backend": list(quantize_choices.BACKEND),
        "quantize --target": list(TARGETS), "prune --method": list(prune_choices.BLOCK_METHOD),
        "prune --importance": list(prune_choices.WIDTH_IMPORTANCE), "prune modes": [f"--{m}" for m in MODES],
        "reparam passes": [f"--{p}" for p in PASSES], "export --format": list(EXPORT_FORMATS),
        "score --methods": list(SCORERS), "--stream": list(STREAM),
        "gate thresholds": [f"--{k.replace('_', '-')}" for k in THRESHOLDS],
    }
    missing = {what: [n for n in ns if f"`{n}" not in text and f"{n}`" not in text and f" {n} " not in text
                      and f"|{n}" not in text and f"{n}|" not in text]
               for what, ns in names.items()}
    assert not {k: v for k, v in missing.items() if v}, missing
