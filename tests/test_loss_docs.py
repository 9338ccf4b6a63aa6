"""The losses the docs name are the losses dpokit has, with the parameters and defaults the docs give them:
README.md's table and list, docs/losses.md's table, and `dpokit train --help`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpokit.cli import app
from dpokit.losses import LOSSES, loss_parameters

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
LOSSES_MD = (REPO / "docs" / "losses.md").read_text()
COMMON = ("sft_weight", "wpo")  # what the prose says every loss but the named exceptions takes


def table_rows(text: str) -> list[list[str]]:
    """The cells of the first table in `text` whose first column names a loss (`` `--loss` ``)."""
    lines = text[text.index("| `--loss` |") :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))])  # `\|` is in a cell
    return rows


def ticked(text: str) -> list[str]:
    return re.findall(r"`(\w+)`", text)


def documented_parameters(rows: list[list[str]], column: int) -> dict[str, dict[str, str]]:
    """Loss name -> {parameter: default as written, or "" where none is given}; ``as `dpo``` copies dpo's row.
    A row ``name + `param` `` only restates a parameter of `name`'s own row."""
    claims: dict[str, dict[str, str]] = {}
    for row in rows:
        if "+" in row[0]:
            continue
        names, cell = ticked(row[0]), row[column]
        params = {}
        copied = re.match(r"as `(\w+)`", cell)
        if copied:
            params.update(claims[copied.group(1)])
            cell = cell[copied.end() :]
        for name, default in re.findall(r"`(\w+)`(?: [^\s(`,]+)?(?: \(([^)]*)\))?", cell):
            params[name] = default
        for name in names:
            claims[name] = params
    return claims


def takers_but(text: str, phrase: str) -> set[str]:
    """The losses `text` says take the common parameters: every one but those named in `phrase`'s match."""
    match = re.search(phrase, text, re.S)
    assert match, f"the docs no longer say which losses take {', '.join(COMMON)}: {phrase!r}"
    return set(LOSSES) - set(ticked(match.group(1)))


def check_claims(source: str, claims: dict[str, dict[str, str]]) -> None:
    for name, params in claims.items():
        assert name in LOSSES, f"{source} names a loss {name!r} that dpokit does not have"
        loss = LOSSES[name]()
        for param, default in params.items():
            assert param in loss_parameters(LOSSES[name]), f"{source}: {name} takes no parameter {param!r}"
            if default:
                value = getattr(loss, param)
                expected = {"true": True, "false": False}.get(default, default)
                assert value == (expected if isinstance(value, (bool, str)) else float(expected)), (
                    f"{source}: {name}'s {param} defaults to {value!r}, not {default}"
                )


def test_docs_losses_table_lists_every_loss_with_all_its_parameters_and_defaults():
    claims = documented_parameters(table_rows(LOSSES_MD.split("## Built-in losses", 1)[1]), column=2)
    check_claims("docs/losses.md", claims)
    assert set(claims) == set(LOSSES), "docs/losses.md's table and dpokit.losses.LOSSES list different losses"
    takers = takers_but(LOSSES_MD, r"Every built-in loss except (.*?) also takes `sft_weight`.*?and `wpo`")
    for name, params in claims.items():
        common = [p for p in COMMON if name in takers]
        assert set(loss_parameters(LOSSES[name])) == {*params, *common}, (
            f"docs/losses.md: {name} takes {loss_parameters(LOSSES[name])}, the docs say {sorted({*params, *common})}"
        )


def test_readme_names_every_loss_and_only_parameters_they_take():
    section = README.split("## Losses", 1)[1].split("\n## ", 1)[0]
    claims = documented_parameters(table_rows(section), column=2)
    check_claims("README.md", claims)
    listed = re.search(r"\nand (`.*?): `docs/losses.md`", section, re.S).group(1)
    assert set(claims) | set(ticked(listed)) == set(LOSSES), "README's loss table and list are not dpokit's losses"
    count = int(re.search(r"a few of the (\d+) built-in\s+objectives", section).group(1))
    assert count == len(set(LOSSES.values())), f"README counts {count} built-in objectives"
    takers = takers_but(section, r"Every built-in loss except (.*?) also takes\s+`sft_weight`.*?`wpo=true`")
    for name, cls in LOSSES.items():
        taken = set(COMMON) & set(loss_parameters(cls))
        assert taken == (set(COMMON) if name in takers else set()), f"README: {name} takes {sorted(taken)}"


@pytest.fixture(scope="module")
def train_help() -> str:
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_train_help_names_only_losses_that_take_each_flags_parameter(train_help):
    flags = re.findall(r"--(\w+) <float> The loss's (\w+) \(([^)]*)\)", train_help)
    assert {param for _, param, _ in flags} >= {"beta", "gamma", "tau"}, train_help
    for flag, param, names in flags:
        named = [n.strip() for n in names.split(",") if n.strip() not in ("...", "")]
        assert flag == param and named
        for name in named:
            assert name in LOSSES, f"--{flag}'s help names a loss {name!r} that dpokit does not have"
            assert param in loss_parameters(LOSSES[name]), f"--{flag}'s help says {name} takes {param}; it does not"
