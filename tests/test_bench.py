"""The benchmarks in bench/ still run: each one's ``--quick`` mode, as ``python bench/X.py --quick`` runs it,
writes a dated section with its numbers; and each stays on its own (it imports no other benchmark).

The scripts run in processes forked from one server that has imported torch, transformers and dpokit once
(`multiprocessing`'s forkserver), so each test pays for its script's work, not for those imports.
"""

from __future__ import annotations

import ast
import datetime
import multiprocessing
import os
import re
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*_bench.py"))
TWO_PROCESSES = {"fsdp_memory_bench.py", "lean_loading_bench.py"}  # real worker processes: -m slow
QUICK_RUNS = [pytest.param(s, marks=pytest.mark.slow) if s in TWO_PROCESSES else s for s in SCRIPTS]
PRELOAD = [
    "torch",
    "transformers.models.llama.modeling_llama",
    "peft",
    "datasets",
    "h5py",
    "dpokit.recipes.dpo",
    "dpokit.reference.compute",
    "dpokit.data.pipeline",
    "dpokit.plan",
    "dpokit.cli",
]
VALUE = r"[+-]?[\d,]*\.?\d+(e[+-]?\d+)?( ?(x|%|s|MiB)| \(\d+\.\d+x\))?"
NUMBER = re.compile(rf"^{VALUE}( / {VALUE})?$")  # 12.5, 1,024, 3.1x, 7%, 0.5 s, 768 (1.30x), 4 / 7

# Per script: rows (by their first cell) whose other cells its section must give as numbers; the rest is
# checked in the test by name.
NUMBER_ROWS = {
    "fingerprint_bench.py": ["`weights_fingerprint`, page cache warm (best of 1)", "ref-logps pass (as it reports it)"],
    "fsdp_memory_bench.py": ["1", "2"],
    "logps_chunk_bench.py": ["checkpointed, 1024 positions (before)", "fused, 32 MiB (8388 positions)"],
    "plan_memory_bench.py": ["model.method=lora", "model.method=full", "model.method=full loss.name=simpo"],
    "prepare_bench.py": ["plain loop (apply_chat_template per row)", "dpokit prepare, in process, --num-proc 1"],
    "ref_logps_bench.py": ["plain HF forward, full logits, unsorted", "dpokit ref-logps pass"],
    "train_bench.py": ["dpokit cache + packing + prefix_sharing"],
}


def run_script(script: str, argv: list[str], log: str) -> None:
    """In a forked child: ``python bench/SCRIPT ARGV`` with stdout and stderr into `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)  # the machine may be shared: a second thread stalls whenever its core is busy
    sys.path.insert(0, str(BENCH))
    sys.argv = [str(BENCH / script), *argv]
    runpy.run_path(str(BENCH / script), run_name="__main__")


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def quick_run(forkserver, tmp_path: Path, script: str, *argv: str) -> tuple[str, str]:
    """Run `script --quick ARGV --out FILE`; (its output, the section it wrote)."""
    out, log = tmp_path / "results.md", tmp_path / "log.txt"
    process = forkserver.Process(target=run_script, args=(script, ["--quick", *argv, "--out", str(out)], str(log)))
    process.start()
    process.join(timeout=120)
    if process.is_alive():
        process.kill()
        pytest.fail(f"{script} --quick ran over 120 s:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    assert process.exitcode == 0, f"{script} --quick failed:\n{output[-4000:]}"
    return output, out.read_text()


def cells(section: str, first: str) -> list[str]:
    """The cells after the first of the table row whose first cell is `first`."""
    for line in section.splitlines():
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and row[0] == first:
            return row[1:]
    raise AssertionError(f"no table row {first!r} in:\n{section}")


def assert_dated_header(section: str, script: str) -> None:
    today = datetime.date.today().isoformat()
    assert section.startswith(f"## {today}: "), section[:200]
    row = cells(section, today)
    machine, torch_version, transformers_version, command = row[:4]
    assert f"{os.cpu_count()} cores" in machine and ("CPU only" in machine or "GPU" in machine)
    assert torch_version[0].isdigit() and transformers_version[0].isdigit()
    assert command.startswith(f"`python bench/{script} --quick")


@pytest.mark.parametrize("script", QUICK_RUNS)
def test_quick_run_writes_a_dated_section_with_its_numbers(forkserver, tmp_path, script):
    output, section = quick_run(forkserver, tmp_path, script)
    assert section.strip() in output  # printed as well as written
    assert_dated_header(section, script)
    for first in NUMBER_ROWS.get(script, []):
        numbers = [cell for cell in cells(section, first) if cell not in ("", "-")]
        assert numbers and all(NUMBER.match(cell) for cell in numbers), (first, numbers)
    if script == "precision_bench.py":
        assert (
            cells(section, "fp32")[0] == "float32 / float32" and cells(section, "bf16 pure")[0] == "bfloat16 / bfloat16"
        )
        assert cells(section, "bf16 mixed")[-1] == "100.0%"  # fp32 master weights take a 1e-6 update
    if script == "lean_loading_bench.py":  # lean loading alone: nothing to compare with
        assert float(cells(section, "lean")[0]) > 0 and cells(section, "lean")[1] == "-"
    if script == "long_context_bench.py":
        dense = cells(section, "1 pair/row, 2k")
        assert dense[1] == "dense" and float(dense[4]) > 0 and dense[7].endswith("x")
        assert "mismatch" not in section
    if script == "ref_writer_bench.py":
        for layout in ("plain", "per-token"):
            commit_rows, code, *numbers = cells(section, layout)
            assert commit_rows == "8" and code == "this tree (after)" and all(map(NUMBER.match, numbers)), numbers
    if script == "train_bench.py":
        assert ("TRL is not installed" in output) != ("TRL DPOTrainer (live reference)" in section)


def test_prepare_memory_mode_runs_quick(forkserver, tmp_path):
    output, section = quick_run(forkserver, tmp_path, "prepare_bench.py", "--memory")
    assert_dated_header(section, "prepare_bench.py")
    small, large = cells(section, "this tree (after)"), section.splitlines()
    assert small[0] == "50" and small[3] == "1.00x"
    assert any(line.startswith("| this tree (after) | 200 |") for line in large)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_imports_no_other_benchmark_patches_no_dpokit_name_and_has_its_results_file(script):
    tree = ast.parse((BENCH / script).read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = {alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in imports if isinstance(node, ast.ImportFrom) and node.module}
    assert modules & {path.stem for path in BENCH.glob("*.py")} <= {"harness"}
    dpokit_names = {
        (alias.asname or alias.name).split(".")[0]
        for node in imports
        for alias in node.names
        if (node.module if isinstance(node, ast.ImportFrom) else alias.name).startswith("dpokit")
    }
    for node in ast.walk(tree):
        for target in getattr(node, "targets", [getattr(node, "target", None)]):
            while isinstance(target, ast.Attribute):
                target = target.value
                assert not (isinstance(target, ast.Name) and target.id in dpokit_names), (
                    f"line {node.lineno} patches dpokit"
                )
    assert (BENCH / script.replace("_bench.py", "_results.md")).is_file()


@pytest.mark.parametrize("results", sorted(path.name for path in BENCH.glob("*_results.md")))
def test_every_run_in_a_results_file_is_a_dated_section_with_machine_versions_and_command(results):
    lines = (BENCH / results).read_text().splitlines()
    sections = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert sections, f"{results} records no run"
    for i in sections:
        date = re.match(r"## (\d{4}-\d\d-\d\d): ", lines[i])
        assert date, lines[i]
        assert lines[i + 2] == "| date | machine | torch | transformers | command |", (results, lines[i])
        row = [cell.strip() for cell in lines[i + 4].strip("|").split("|")]
        assert row[0] == date.group(1) and "cores" in row[1] and row[4].startswith("`"), (results, row)


def test_the_gpu_check_script_parses_and_says_how_to_run_it():
    import subprocess

    script = BENCH / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)  # syntax only: the checks themselves need a GPU
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--cpu-smoke" in usage and "--skip-install" in usage and "gpu_check.json" in usage
