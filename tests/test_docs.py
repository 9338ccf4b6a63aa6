"""Every command shown in README.md, docs/*.md, the shipped configs' comments and the recipe's
docstring is exercised: quick ones run (`--help`, `config`, `eject`), the rest must parse.

"Parse" means what the real program would accept before doing any work: for `dpokit`, click
parses the arguments of the command (unknown flags, missing required options and bad values fail);
for `dpokit train` and recipe scripts, the config name and every dotted override also validate; for
torchrun, torch's own argument parser accepts the launcher flags.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer

from dpokit import cli
from dpokit.config import parse_recipe_args, shipped_configs_dir
from dpokit.eject import DEFAULT_RECIPE_DEST

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
PROGRAMS = ("dpokit", "torchrun", "python", "python3", "pip", ".")
RUN_FOR_REAL = (("config", "list"), ("config", "show"), ("eject", "recipe"), ("eject", "config"))
RECIPE_SCRIPTS = ("recipes/dpo.py", DEFAULT_RECIPE_DEST.name)
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*")  # N, MODEL: a value the reader fills in


# ---------------------------------------------------------------------------------------------
# Extraction


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def commands_in_markdown(text: str) -> list[tuple[str, bool]]:
    """(command, whole) for shell commands in fenced shell blocks, 4-space indented blocks and
    `inline code` spans. An inline span may be a fragment (`dpokit ref-logps --gpus N`): not whole.

    In a bash/sh block every line counts; in an unlabelled block (also used for diagrams and file
    trees) and in indented blocks, only lines that start with a known program.
    """
    commands = []
    for part_index, part in enumerate(re.split(r"^[ \t]*```", text, flags=re.MULTILINE)):  # list items indent theirs
        if part_index % 2 == 0:  # prose: indented blocks and spans, in the order the page shows them
            commands += commands_in_prose(part)
            continue
        language, _, body = part.partition("\n")
        if language.strip() not in SHELL_BLOCKS:
            continue
        for line in logical_lines(body):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if language.strip() or line.split()[0] in PROGRAMS:
                commands.append((line, True))
    return commands


def commands_in_prose(prose: str) -> list[tuple[str, bool]]:
    """(command, whole) of 4-space indented lines (whole) and `inline code` spans (fragments), in order."""
    commands = []
    for line in logical_lines(prose):
        if line.startswith("    ") and line.split()[0] in PROGRAMS:
            commands.append((line.strip(), True))
        spans = [] if line.startswith("    ") else re.findall(r"`([^`\n]+)`", line)
        commands += [(span, False) for span in spans if span.split()[0] in ("dpokit", "torchrun", "python")]
    return commands


def commands_in_comments(text: str) -> list[str]:
    """Commands quoted in `#   dpokit ...` comment lines (configs) or indented docstring lines."""
    found = []
    for line in text.splitlines():
        body = line.lstrip("# ").strip() if line.lstrip().startswith("#") else line.strip()
        if body.split()[:1] and body.split()[0] in ("dpokit", "torchrun", "python"):
            found.append(body)
    return found


def documented_commands() -> list[tuple[str, str, bool]]:
    """(source, command, whole) for every documented command, in order of appearance."""
    found = []
    for path in DOCS:
        found += [(path.name, command, whole) for command, whole in commands_in_markdown(path.read_text())]
    for path in sorted(shipped_configs_dir().glob("*.yaml")):
        found += [(path.name, command, True) for command in commands_in_comments(path.read_text())]
    recipe_doc = (REPO / "recipes" / "dpo.py").read_text().split('"""')[1]
    found += [("recipes/dpo.py", command, True) for command in commands_in_comments(recipe_doc)]
    return found


def split_command(command: str) -> list[list[str]]:
    """Argument lists of each command joined by `&&`, without `VAR=value` prefixes, `srun` and `...`.

    A shell variable set from a command (`head=$(...)`, in a job script) and a line of shell control
    flow (`if [ -d runs ]; then`, `else`, `fi`) are glue, not commands.
    """
    if re.match(r"\w+=\$\(", command) or re.match(r"(if|then|else|elif|fi)\b", command):
        return []
    pieces = []
    for piece in command.split("&&"):
        args = [arg for arg in shlex.split(piece) if arg != "..."]
        while args and re.fullmatch(r"[A-Z_]+=.*", args[0]):
            args.pop(0)
        if args and args[0] == "srun":
            args.pop(0)
        if args:
            pieces.append(args)
    return pieces


# ---------------------------------------------------------------------------------------------
# Checks


def ci_test_command() -> str:
    """README's test command as .ci/run extracts it (its own sed line, run by bash)."""
    sed = next(line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("test_cmd=$("))
    script = sed.removeprefix("test_cmd=$(").removesuffix(")")
    return subprocess.run(["bash", "-c", script], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def resolve_dpokit(args: list[str]):
    """The command path of `dpokit ARGS` (e.g. ["cache", "info"]), its Typer/click command, and the rest."""
    command = typer.main.get_command(cli.app)
    path, rest = [], list(args)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        assert rest[0] in command.commands, f"dpokit has no command {' '.join(path + rest[:1])!r}"
        path.append(rest.pop(0))
        command = command.commands[path[-1]]
    return path, command, rest


def synopsis_to_args(command, args: list[str]) -> list[str]:
    """Read usage notation as an example: `[--flag A]` is used, a CAPITALS value of a number option is 1."""
    hints = typing.get_type_hints(command.callback)
    numbers = {
        opt
        for param in command.params
        for opt in param.opts
        if {int, float} & {hints[param.name], *typing.get_args(hints[param.name])}
    }  # int, Optional[int], ...
    args = [arg.strip("[]") for arg in args]
    return ["1" if PLACEHOLDER.fullmatch(arg) and i and args[i - 1] in numbers else arg for i, arg in enumerate(args)]


def parse_dpokit(args: list[str], whole: bool):
    """Parse `dpokit ARGS` with click, as far as the command's own arguments; nothing runs.

    A fragment (`dpokit ref-logps --gpus N` in prose) only has to name an existing command and
    options it has: no context is returned.
    """
    path, command, rest = resolve_dpokit(args)
    if not whole:
        known = {opt for param in command.params for opt in param.opts}
        unknown = [arg for arg in rest if arg.startswith("--") and arg.split("=")[0] not in known]
        assert not unknown, f"dpokit {' '.join(path)} has no option {', '.join(unknown)}"
        return path, None
    return path, command.make_context(" ".join(["dpokit", *path]), synopsis_to_args(command, rest))


def check_train_config(ctx) -> None:
    """`dpokit train`: the config name and every override (from flags and key=value) validate."""
    parse_recipe_args(cli.train_argv(ctx.params))


def check_recipe_script(args: list[str], cwd: Path) -> None:
    """`python SCRIPT ...` / torchrun's script: a recipe whose arguments validate."""
    script, recipe_args = args[0], args[1:]
    assert script.removeprefix("./") in RECIPE_SCRIPTS or (cwd / script).is_file(), f"unknown script {script}"
    parse_recipe_args(recipe_args)


def check_repo_script(args: list[str]) -> None:
    """`python examples/x.py --flag ...`: the script exists and its --help lists every flag used."""
    script = REPO / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    flags = [arg.split("=")[0] for arg in args[1:] if arg.startswith("--")]
    if flags:
        usage = subprocess.run(
            [sys.executable, str(script), "--help"], check=True, capture_output=True, text=True
        ).stdout
        assert all(flag in usage for flag in flags), f"{args[0]} --help lacks one of {flags}"


def check_torchrun(args: list[str], cwd: Path) -> list[str]:
    """`torchrun FLAGS SCRIPT ARGS`: torch's launcher accepts FLAGS, and SCRIPT is a recipe taking ARGS; or
    `torchrun FLAGS -m dpokit COMMAND ...`: returns that dpokit command line for the caller to check."""
    from torch.distributed.run import get_args_parser

    if "-m" in args and args[args.index("-m") + 1] == "dpokit":
        module_at = args.index("-m")
        get_args_parser().parse_args(args[: module_at + 2])
        return args[module_at + 2 :]
    script_at = next(i for i, arg in enumerate(args) if arg.endswith(".py"))
    get_args_parser().parse_args(args[: script_at + 1])  # exits (SystemExit) on an unknown launcher flag
    check_recipe_script(args[script_at:], cwd)
    return []


def check_install(args: list[str]) -> None:
    """Setup lines (venv, activate, pip install) must do what .ci/run does."""
    ci = (REPO / ".ci" / "run").read_text()
    if args[0] == "pip":
        assert args[1] == "install"
        for package in args[2:]:
            assert package.replace('"', "") in ci.replace('"', ""), (
                f"{package} is not installed the same way by .ci/run"
            )
    elif args[0] == ".":
        assert args[1:] == [".venv/bin/activate"] and ". .venv/bin/activate" in ci
    else:
        assert args[1:] == ["-m", "venv", ".venv"] and "python3 -m venv .venv" in ci


def exercise(args: list[str], cwd: Path, capsys, whole: bool = True) -> None:
    """Run a quick command for real in `cwd`, or check that a slow one parses (`whole`) or names
    a command and its options (a fragment in prose)."""
    program = args[0]
    if program in ("python", "python3") and args[1:3] == ["-m", "pytest"]:  # README's command, or its slow half
        ci = (REPO / ".ci" / "run").read_text()
        assert shlex.join(args) == ci_test_command() or shlex.join(args) in ci.splitlines()
    elif program in ("python", "python3") and args[1:3] == ["-m", "venv"] or program in ("pip", "."):
        check_install(args)
    elif program in ("python", "python3") and args[1:3] == ["-m", "torch.distributed.run"]:
        check_torchrun(args[3:], cwd)
    elif program in ("python", "python3") and args[1:3] == ["-m", "dpokit"]:
        exercise(["dpokit", *args[3:]], cwd, capsys, whole)
    elif program in ("python", "python3") and args[1].startswith(("examples/", "bench/")):
        check_repo_script(args[1:])
    elif program in ("python", "python3"):
        check_recipe_script(args[1:], cwd)
    elif program == "torchrun" and not whole:
        assert len(args) == 1, "a torchrun fragment in prose"  # the program named, not a command
    elif program == "torchrun":
        dpokit_args = check_torchrun(args[1:], cwd)
        if dpokit_args:  # `torchrun ... -m dpokit train ...`: the dpokit command must parse
            path, ctx = parse_dpokit(dpokit_args, whole)
            if ctx is not None and path == ["train"]:
                check_train_config(ctx)
    elif program == "dpokit":
        if "--help" in args or "-h" in args:
            assert cli.main(args[1:]) == 0
            assert "Usage" in capsys.readouterr().out
            return
        path, ctx = parse_dpokit(args[1:], whole)
        if ctx is None:
            return
        if tuple(path) in RUN_FOR_REAL:
            assert cli.main(args[1:]) == 0, capsys.readouterr().err
        elif path == ["train"]:
            check_train_config(ctx)
    else:
        pytest.fail(f"no check for documented command {shlex.join(args)!r}; add one to tests/test_docs.py")


# ---------------------------------------------------------------------------------------------
# Tests


def test_readme_test_command_is_what_ci_runs():
    assert ci_test_command() == "python -m pytest -q tests"
    assert "    python -m pytest -q tests" in (REPO / "README.md").read_text().splitlines()


def test_docs_show_commands_for_every_stage():
    commands = [command for _, command, _ in documented_commands()]
    for start in (
        "dpokit quickstart",
        "dpokit prepare",
        "dpokit ref-logps",
        "dpokit train",
        "dpokit eject recipe",
        "dpokit eject config",
        "torchrun",
        "python dpo_recipe.py",
    ):
        assert any(command.startswith(start) for command in commands), start


@pytest.mark.parametrize("source", sorted({source for source, _, _ in documented_commands()}))
def test_every_documented_command_runs_or_parses(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # ejected files land here, where later commands of the same page use them
    for name, code in documented_modules(source).items():  # "Save it as my_losses.py": as the reader would
        (tmp_path / name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))  # the page's PYTHONPATH=.
    commands = [(command, whole) for where, command, whole in documented_commands() if where == source]
    assert commands
    for command, whole in commands:
        for args in split_command(command):
            try:
                exercise(args, tmp_path, capsys, whole)
            except (SystemExit, Exception) as exc:  # click errors, argparse exits, DpokitError, failed asserts
                pytest.fail(f"{source}: {command!r} fails: {type(exc).__name__}: {exc}")


def documented_modules(source: str) -> dict[str, str]:
    """Python blocks a page tells the reader to save, by file name (their docstring starts with ``NAME.py:``)."""
    path = next((p for p in DOCS if p.name == source), None)
    if path is None:
        return {}
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {match[1]: block for block in blocks if (match := re.match(r'"""(\w+\.py):', block))}


def test_the_custom_loss_example_in_docs_losses_trains(tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    import math

    from dpokit.metrics import read_metrics

    text = (REPO / "docs" / "losses.md").read_text()
    (tmp_path / "my_losses.py").write_text(documented_modules("losses.md")["my_losses.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        "tiny_lora",
        "--loss",
        "my_losses:MarginDPOLoss",
        "loss.beta=0.1",
        "loss.margin=0.5",
        f"model.path={tiny_model_dir}",
        f"data.path={prepared_dir}",
        f"output.dir={run}",
        "reference.source=live",
        "training.max_steps=2",
        "training.eval_every=0",
    ]
    assert cli.main(args) == 0
    first = read_metrics(run, "train")[0]
    assert first["loss"] == pytest.approx(math.log(1 + math.exp(0.5)), abs=1e-5)  # -log sigmoid(-0.5) = 0.974
    assert "0.974" in text


# ---------------------------------------------------------------------------------------------
# In order: the commands of one page, run one after another in one folder, must not collide

# dpokit commands that write one output (the option naming it) and refuse to replace it without --overwrite
# (`--force` for eject); `cache audit --out` is replaced freely, its `--write-filtered` is not.
WRITERS = {
    ("prepare",): "out",
    ("ref-logps",): "out",
    ("export",): "out",
    ("quickstart",): "out",
    ("iterate",): "out",
    ("sample",): "out",
    ("score",): "out",
    ("select",): "out",
    ("cache", "audit"): "write_filtered",
    ("eject", "recipe"): "dest",
    ("eject", "config"): "dest",
}


def written_output(args: list[str], cwd: Path) -> tuple[str, bool, str] | None:
    """(output, replaces on purpose, what needs it) of one documented command, or None when it writes nothing
    a later command could collide with. A train run (or a recipe script) writes ``output.dir`` and may reuse it
    with --resume or --overwrite."""
    program = args[0]
    if program in ("python", "python3") and args[1:3] == ["-m", "dpokit"]:
        return written_output(["dpokit", *args[3:]], cwd)
    if program == "torchrun":
        rest = args[1:]
        if "-m" in rest and rest[rest.index("-m") + 1] == "dpokit":
            return written_output(["dpokit", *rest[rest.index("-m") + 2 :]], cwd)
        script_at = next((i for i, arg in enumerate(rest) if arg.endswith(".py")), None)
        return None if script_at is None else run_output(parse_recipe_args(rest[script_at + 1 :]))
    if program in ("python", "python3") and len(args) > 1 and args[1].removeprefix("./") in RECIPE_SCRIPTS:
        return run_output(parse_recipe_args(args[2:]))
    if program != "dpokit" or "--help" in args or "-h" in args:
        return None
    path, ctx = parse_dpokit(args[1:], whole=True)
    if path == ["train"]:
        cfg = parse_recipe_args(cli.train_argv(ctx.params))
        assert cfg.model.path, "train needs --model (or model.path): neither the flags nor the config name one"
        return run_output(cfg)
    key = WRITERS.get(tuple(path))
    if key is None or not ctx.params.get(key):
        return None
    if key == "dest" and ctx.params.get("dest") is None:
        return None
    replaces = bool(ctx.params.get("overwrite") or ctx.params.get("force"))
    return str(Path(ctx.params[key])), replaces, "--force" if path[0] == "eject" else "--overwrite"


def run_output(cfg) -> tuple[str, bool, str]:
    return str(Path(cfg.output.dir)), bool(cfg.output.resume or cfg.output.overwrite), "--resume or --overwrite"


def collisions_in_order(source: str) -> list[str]:
    """The documented commands of `source` that would write, in the order shown, into an output an earlier
    command of the same page made, without saying they mean to replace (or resume) it."""
    made: dict[str, str] = {}  # output -> the command that made it
    found = []
    for _, command, whole in [entry for entry in documented_commands() if entry[0] == source]:
        if not whole:
            continue
        for args in split_command(command):
            if PLACEHOLDER.fullmatch(args[0]):
                continue
            written = written_output(args, Path.cwd())
            if written is None:
                continue
            output, replaces, needs = written
            if output in made and not replaces:
                found.append(f"{command!r} writes {output}, which {made[output]!r} made ({needs} is missing)")
            made.setdefault(output, command)
            if args[:2] == ["dpokit", "eject"]:  # quick: made for real, for the commands that run what it wrote
                assert cli.main(args[1:]) == 0
    return found


# Pages whose commands are still alternatives side by side (several `prepare ... --out prepared` of one format
# each, a job script's if/else) rather than steps in order: to do, each its own output.
@pytest.mark.parametrize("source", sorted({source for source, _, _ in documented_commands()}))
def test_documented_commands_run_in_order_without_colliding(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # one folder per page, as a reader runs it
    assert collisions_in_order(source) == []
