"""What a newcomer does in the first hour, run for real: README's commands on the bundled demo, in the order shown,
in one folder, and a plain quickstart that prints no warning.

`tests/test_docs.py` parses every documented command and checks each page's order for collisions; here the
README's runnable ones (no placeholders such as MODEL, no hub model, no GPU, no optional tracker) execute."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import documented_commands, split_command
from test_eject import subprocess_env

REPO = Path(__file__).resolve().parents[1]
# What a CPU-only checkout without network or optional extras cannot run as written.
NOT_HERE = re.compile(
    r"\b(MODEL|REF|DATA|POLICY|PREPARED|RUN)\b|\.\.\.|llama3_1_8b|long\.jsonl|my_dpo\.yaml|my_recipe\.py|"
    r"torchrun|bench/|pytest|venv|WANDB|--gpus|eager"
)
WARNING = re.compile(r"warn", re.IGNORECASE)


def runnable_readme_commands() -> list[list[str]]:
    """README's whole commands (from its code blocks, not inline mentions) that run here, in order."""
    runnable = []
    for source, command, whole in documented_commands():
        if source != "README.md" or not whole or NOT_HERE.search(command):
            continue
        for args in split_command(command):
            if args[0] in ("dpokit", "python"):
                runnable.append(args)
    return runnable


def executable(args: list[str]) -> list[str]:
    """`args` with ``dpokit`` and ``python`` as this interpreter runs them."""
    if args[0] == "dpokit":
        return [sys.executable, "-m", "dpokit", *args[1:]]
    return [sys.executable, *args[1:]]


@pytest.mark.slow
def test_the_readmes_commands_run_in_order_in_one_folder(tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the README's paths are the checkout's
    commands = runnable_readme_commands()
    names = [" ".join(args[:3]) for args in commands]
    assert len(commands) >= 25, names  # the demo pipeline, ranked, unpaired, iterate, audit, eject, resume ...
    for args in commands:
        done = subprocess.run(executable(args), cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(args)}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_a_plain_quickstart_prints_no_warning(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dpokit", "quickstart", "--out", str(tmp_path / "qs"), "--max-steps", "10"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in (done.stdout + done.stderr).splitlines() if WARNING.search(line)]
    assert warned == []
