"""`dpokit eject`: the copies match what ships (under an ``# Ejected by dpokit`` line), ``--force``
replaces only an earlier eject, and an edited recipe runs the three ways its docstring promises
(dpokit train --recipe, python, torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dpokit.artifacts import ejected_header
from dpokit.cli import main
from dpokit.config import load_config, shipped_config_names, shipped_configs_dir
from dpokit.launch import builtin_recipe_path
from dpokit.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ADDED_METRIC = '        values["logps/gap"] = values["logps/chosen"] - values["logps/rejected"]  # added after eject\n'


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def shipped_with_header(source: Path) -> bytes:
    """What eject writes: the marker line, then the shipped file byte for byte."""
    return ejected_header(source).encode() + source.read_bytes()


def test_eject_recipe_copies_the_builtin_and_needs_force_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eject", "recipe"]) == 0
    ejected = tmp_path / "dpo_recipe.py"
    assert ejected.read_bytes() == shipped_with_header(builtin_recipe_path())
    assert ejected.read_text().startswith("# Ejected by dpokit ")
    ejected.write_text(ejected.read_text() + "# my edits\n")
    capsys.readouterr()
    assert main(["eject", "recipe"]) == 1
    err = capsys.readouterr().err
    assert "dpo_recipe.py already exists; pass --force to replace it, or choose another destination" in err
    assert ejected.read_text().endswith("# my edits\n")
    assert main(["eject", "recipe", "--force"]) == 0
    assert ejected.read_bytes() == shipped_with_header(builtin_recipe_path())


def test_eject_force_never_replaces_a_file_dpokit_did_not_eject(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "dpo_recipe.py"
    mine.write_text("# my own training script\n")
    assert main(["eject", "recipe", "--force"]) == 1
    err = capsys.readouterr().err
    assert (
        "refusing to replace dpo_recipe.py: it is not a file written by `dpokit eject` (its first line is not "
        "'# Ejected by dpokit'); dpokit only replaces what it wrote: choose another destination or remove it yourself"
    ) in err
    assert len(err.strip().splitlines()) == 1
    assert mine.read_text() == "# my own training script\n"
    assert [p.name for p in tmp_path.iterdir()] == ["dpo_recipe.py"]


def test_eject_config_copies_a_shipped_config_that_loads_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eject", "config", "demo_lora"]) == 0
    assert (tmp_path / "demo_lora.yaml").read_bytes() == shipped_with_header(shipped_configs_dir() / "demo_lora.yaml")
    (tmp_path / "configs").mkdir()
    assert main(["eject", "config", "tiny_lora", "configs"]) == 0  # into a folder: under the shipped name
    assert (tmp_path / "configs" / "tiny_lora.yaml").is_file()
    assert main(["eject", "config", "tiny_lora", str(tmp_path / "mine.yaml")]) == 0
    assert load_config(str(tmp_path / "mine.yaml")) == load_config("tiny_lora")
    assert main(["eject", "config", "tiny_lora", str(tmp_path / "mine.yaml")]) == 1
    assert "mine.yaml already exists; pass --force" in capsys.readouterr().err
    assert main(["eject", "config", "tiny_lora", str(tmp_path / "mine.yaml"), "--force"]) == 0
    assert main(["eject", "config", "nope"]) == 1
    assert "unknown config 'nope'" in capsys.readouterr().err


def eject_with_added_metric(dest: Path) -> Path:
    """Eject the recipe and add a metric to `step_metrics()`, as a user would."""
    assert main(["eject", "recipe", str(dest)]) == 0
    source = dest.read_text()
    start = source.index("    def step_metrics(")
    end = source.index("        return values\n", start)
    dest.write_text(source[:end] + ADDED_METRIC + source[end:])
    return dest


def run_as_script(path: Path, argv: list[str]) -> int:
    """`python PATH ARGV...` in this process: the file runs as ``__main__`` with that command line."""
    import runpy
    from unittest import mock

    with mock.patch.object(sys, "argv", [str(path), *argv]):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exc:
            return exc.code or 0
    return 0


@pytest.mark.slow
def test_an_edited_ejected_recipe_runs_three_ways(tiny_model_dir, prepared_dir, tmp_path):
    recipe = eject_with_added_metric(tmp_path / "dpo_recipe.py")
    common = [
        "--config",
        "tiny_lora",
        f"model.path={tiny_model_dir}",
        f"data.path={prepared_dir}",
        "reference.source=live",
        "training.max_steps=3",
        "training.eval_every=0",
        "optimizer.lr=1e-2",
    ]
    runs = {name: tmp_path / name for name in ("dpokit_train", "python", "torchrun")}

    assert (
        main(["train", "--recipe", str(recipe), *common, "data.batch_size=4", f"output.dir={runs['dpokit_train']}"])
        == 0
    )
    assert run_as_script(recipe, [*common, "data.batch_size=4", f"output.dir={runs['python']}"]) == 0
    # Two processes with 2 pairs each: the same global batch of 4 as the single-process runs.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--standalone",
            str(recipe),
            *common,
            "data.batch_size=2",
            f"output.dir={runs['torchrun']}",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )

    losses = {}
    for name, run in runs.items():
        records = read_metrics(run, "train")
        assert len(records) == 3, name
        for record in records:
            assert record["logps/gap"] == pytest.approx(record["logps/chosen"] - record["logps/rejected"], abs=1e-9), (
                name
            )
        losses[name] = [r["loss"] for r in records]
    assert losses["python"] == pytest.approx(losses["dpokit_train"], abs=1e-6)
    assert losses["torchrun"] == pytest.approx(losses["dpokit_train"], abs=1e-4)
    assert losses["dpokit_train"][0] == pytest.approx(0.693147, abs=1e-5)  # ln 2: step 1 starts at the reference


FORWARD_CALL = "        completions = head_logps(model, hidden, batch, self.cfg.data.logps_chunk_size, self.token_stats)  # fused head\n"
EXACT_EDIT = (
    "        completions = head_logps(model, hidden, batch, 5, self.token_stats)  # smaller chunks, same values\n"
)
DIVERGING_EDIT = (
    FORWARD_CALL
    + "        completions = completions._replace(logps=completions.logps / 1.1)  # a temperature the cache was not made with\n"
)


def eject_with_forward(dest: Path, forward: str) -> Path:
    """Eject the recipe and replace the body of its forward pass (`policy_logps`)."""
    assert main(["eject", "recipe", str(dest)]) == 0
    source = dest.read_text()
    assert source.count(FORWARD_CALL) == 1
    dest.write_text(source.replace(FORWARD_CALL, forward))
    return dest


def cached_run_args(recipe: Path, model_dir: Path, data_dir: Path, cache: Path, run: Path) -> list[str]:
    return [
        "train",
        "--recipe",
        str(recipe),
        "--config",
        "tiny_lora",
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--ref-cache",
        str(cache),
        "--out",
        str(run),
        "--max-steps",
        "1",
        "training.eval_every=0",
    ]


def test_a_recipe_whose_forward_keeps_the_log_probs_trains_on_the_cache(
    tiny_model_dir, prepared_dir, ref_cache, tmp_path
):
    recipe = eject_with_forward(tmp_path / "dpo_recipe.py", EXACT_EDIT)
    assert main(cached_run_args(recipe, tiny_model_dir, prepared_dir, ref_cache, tmp_path / "run")) == 0
    (first,) = read_metrics(tmp_path / "run", "train")
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # ln 2: the edited forward matches the cache
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


def test_a_recipe_whose_forward_changes_the_log_probs_is_stopped_before_any_update(
    tiny_model_dir, prepared_dir, ref_cache, tmp_path, capsys
):
    recipe = eject_with_forward(tmp_path / "dpo_recipe.py", DIVERGING_EDIT)
    run = tmp_path / "run"
    assert main(cached_run_args(recipe, tiny_model_dir, prepared_dir, ref_cache, run)) == 1
    err = capsys.readouterr().err
    assert "step-0 check: the policy does not start as the reference" in err
    assert "a recipe whose forward (`policy_logps`) was edited" in err
    assert read_metrics(run, "train") == [] and not list(run.glob("checkpoints/step_*"))


def build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (setuptools writes build/ next to what it builds)."""
    import shutil

    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dpokit", "recipes", "examples/demo"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("dpokit-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_the_wheel_ships_recipe_configs_and_demo_and_ejects_from_the_installed_package(tmp_path, wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dpokit/recipes/dpo.py" in names
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / "dpokit").rglob("*.py")}
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"  # every package listed
    assert {f"dpokit/recipes/configs/{name}.yaml" for name in shipped_config_names()} <= names
    assert {
        "dpokit/recipes/configs/models/llama3_1_8b.json",
        "dpokit/recipes/configs/models/qwen2_5_0_5b.json",
    } <= names
    assert {
        "dpokit/demo/data/train.jsonl",
        "dpokit/demo/data/eval.jsonl",
        "dpokit/demo/model/config.json",
        "dpokit/demo/model/model.safetensors",
        "dpokit/demo/model/tokenizer.json",
        "dpokit/demo/data/ranked.jsonl",
        "dpokit/demo/data/unpaired.jsonl",
        "dpokit/demo/reward_model/config.json",
        "dpokit/demo/reward_model/model.safetensors",
        "dpokit/demo/reward_model/tokenizer.json",
    } <= names
    assert not any(name.startswith(("tests/", "examples/")) for name in names)

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {**subprocess_env(), "PYTHONPATH": str(site)}  # ahead of the editable install of this checkout
    script = (
        "from dpokit.cli import main; from dpokit.launch import builtin_recipe_path; from dpokit.quickstart import demo_files\n"
        "assert main(['eject', 'recipe']) == 0 and main(['eject', 'config', 'qwen2_5_0_5b_full']) == 0\n"
        "print(builtin_recipe_path()); print(demo_files().model)\n"
    )
    where = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, check=True, capture_output=True, text=True
    )
    assert where.stdout.splitlines()[-2:] == [
        str(site / "dpokit" / "recipes" / "dpo.py"),
        str(site / "dpokit" / "demo" / "model"),
    ]
    assert (work / "dpo_recipe.py").read_bytes() == shipped_with_header(builtin_recipe_path())
    assert (work / "qwen2_5_0_5b_full.yaml").read_bytes() == shipped_with_header(
        shipped_configs_dir() / "qwen2_5_0_5b_full.yaml"
    )


EXTRAS_MODULES = ("tensorboard", "wandb", "mlflow", "trackio", "trl")  # what only an extra installs


@pytest.mark.slow
def test_the_wheel_without_extras_runs_the_quickstart_to_the_end(tmp_path, wheel):
    """`pip install dpokit` and `dpokit quickstart`: a venv of its own with the wheel installed by pip, its
    dependencies lent from this environment (a .pth file, so this checkout's editable install is not seen) and
    every extra's package blocked. The quickstart finishes, lifts the eval reward accuracy from chance, shows the
    rude demo model's replies before and after, draws its curves and says once what TensorBoard needs."""
    import site
    import venv

    from dpokit.artifacts import read_marker
    from dpokit.quickstart import PROMPTS

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    (fresh_site,) = fresh.glob("lib/python*/site-packages")
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (fresh_site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {EXTRAS_MODULES!r}:\n    sys.modules[name] = None\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(fresh / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [str(fresh / "bin" / "dpokit"), "quickstart", "--max-steps", "10", "--out", "qs"],
        cwd=tmp_path,
        env={**subprocess_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "TensorBoard" not in output and "warn" not in output.lower()  # no tracker by default, no warning
    assert "kernels" not in output  # bitsandbytes (and its warning) stays out of a run that does not use it
    where = subprocess.run(
        [str(fresh / "bin" / "python"), "-c", "import dpokit; print(dpokit.__file__)"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(fresh_site)  # the wheel's dpokit, not this checkout's

    run = tmp_path / "qs" / "run"
    evals = {r["step"]: r for r in read_metrics(run, "eval")}
    before, after = evals[0], evals[10]
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # step 0: the policy is the reference
    assert before["rewards/accuracies"] <= 0.55
    # eval asks questions train never did: ten steps lift accuracy from chance to 0.765 (measured), 0.8 at twenty
    assert after["rewards/accuracies"] > 0.7 and after["rewards/margins"] > 0.01 and after["loss"] < before["loss"]
    assert "reward accuracy" in output and "step 10" in output and "greedy replies" in output
    assert all(prompt[:20] in output for prompt in PROMPTS)
    assert output.count("no.") >= len(PROMPTS)  # the demo model is rude first: every reply before opens with "no."
    for name in ("loss", "accuracy", "margins", "rewards"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "qs" / "ref.h5").is_file()
    assert (
        read_marker(tmp_path / "qs")["kind"] == "quickstart"
        and read_marker(tmp_path / "qs" / "prepared")["kind"] == "prepared"
    )
