"""Training from the reference cache is exactly training with the live reference."""

from __future__ import annotations

import shutil

import h5py
import pytest
from conftest import train_cli_args

from dpokit.cli import main
from dpokit.metrics import read_metrics
from dpokit.reference.cache import ROW_CRC, ROW_DATASETS, row_checksums


def train_args(model_dir, data_dir, run_dir, method, *extra):
    """Five steps of `method` with an eval at the end, on the live reference unless `extra` names the cache."""
    return train_cli_args(
        model_dir,
        data_dir,
        run_dir,
        "--method",
        method,
        "--max-steps",
        "5",
        "optimizer.lr=1e-3",
        "training.eval_every=5",
        *extra,
    )


def on_cache(cache) -> tuple[str, str]:
    return "reference.source=cache", f"reference.cache={cache}"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cache_gives_the_same_losses_as_the_live_reference(method, tiny_model_dir, prepared_dir, ref_cache, tmp_path):
    live, cached = tmp_path / "live", tmp_path / "cached"
    assert main(train_args(tiny_model_dir, prepared_dir, live, method)) == 0
    assert main(train_args(tiny_model_dir, prepared_dir, cached, method, *on_cache(ref_cache))) == 0
    for split in ("train", "eval"):
        want, got = read_metrics(live, split), read_metrics(cached, split)
        assert len(got) == len(want) > 0
        for w, g in zip(want, got):
            assert g["loss"] == pytest.approx(w["loss"], abs=1e-4)
            assert g["rewards/margins"] == pytest.approx(w["rewards/margins"], abs=1e-4)
    first = read_metrics(cached, "train")[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


def test_cache_from_other_data_is_refused_in_one_line(tiny_model_dir, style_prepared_dir, ref_cache, tmp_path, capsys):
    args = train_args(tiny_model_dir, style_prepared_dir, tmp_path / "run", "lora", *on_cache(ref_cache))
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "data_fingerprint differs" in err
    assert "dpokit ref-logps" in err


def test_cache_from_another_model_is_refused(tmp_path, prepared_dir, ref_cache, tiny_model_dir, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01 * torch.ones_like(weights[name])
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert main(train_args(other, prepared_dir, tmp_path / "run", "lora", *on_cache(ref_cache))) == 1
    assert "reference_fingerprint differs" in capsys.readouterr().err


def test_a_refused_overwrite_leaves_the_old_run_exactly_as_it_was(
    tiny_model_dir, prepared_dir, style_prepared_dir, ref_cache, tmp_path, capsys
):
    import hashlib

    def contents(folder):
        return {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    run = tmp_path / "run"
    first = train_cli_args(
        tiny_model_dir,
        prepared_dir,
        run,
        "--max-steps",
        "2",
        "training.save_every=1",
        "training.eval_every=0",
        *on_cache(ref_cache),
    )
    assert main(first) == 0
    before = contents(run)
    assert any(name.startswith("checkpoints/") for name in before) and "metrics.jsonl" in before
    # Another data set than the cache's is refused in setup; so is a model that cannot load.
    other_data = train_cli_args(
        tiny_model_dir, style_prepared_dir, run, "--max-steps", "2", "--overwrite", *on_cache(ref_cache)
    )
    no_model = train_cli_args(
        tmp_path / "missing_model", prepared_dir, run, "--max-steps", "2", "--overwrite", *on_cache(ref_cache)
    )
    # A cache of the same inputs whose values are not this policy's: only the step-0 check on the first batch sees it.
    shifted = tmp_path / "shifted.h5"
    shutil.copy(ref_cache, shifted)
    with h5py.File(shifted, "r+") as handle:
        group = handle["train"]
        group["chosen_logps"][...] = group["chosen_logps"][()] + 1.0
        group[ROW_CRC][...] = row_checksums({name: group[name][()] for name in ROW_DATASETS})
    not_the_reference = train_cli_args(
        tiny_model_dir, prepared_dir, run, "--max-steps", "2", "--overwrite", *on_cache(shifted)
    )
    for refused, why in (
        (other_data, "data_fingerprint differs"),
        (no_model, "no config.json"),
        (not_the_reference, "step-0 check"),
    ):
        capsys.readouterr()
        assert main(refused) == 1
        assert why in capsys.readouterr().err
        assert contents(run) == before
    assert main(first + ["--overwrite"]) == 0  # accepted: the old run's files are replaced by the new run's
    assert len(read_metrics(run, "train")) == 2
