"""Pair scores (``score_chosen``/``score_rejected``, prepared as ``chosen_score``/``rejected_score``) reach the loss:
the batch holds them in slot order in every layout, the policy's, the live and the cached reference's outputs carry
them, a custom loss trains on them, and `dpokit cache audit` reports them and keeps them in `--write-filtered`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tiny
import torch
from conftest import ref_logps_args, train_cli_args

from dpokit.cli import main
from dpokit.data.collate import collate_pairs
from dpokit.data.loader import collated, example_rows
from dpokit.data.prepared import load_prepared
from dpokit.logps import concatenated_forward
from dpokit.reference.audit import AuditOptions, run_audit
from dpokit.reference.source import CachedReference, LiveReference

REPO = Path(__file__).resolve().parents[1]
ROWS = 16
TIE, MISSING, DUPLICATE = 2, 5, 9  # rows: equal scores, no rejected score, the prompt of row 1 again
LAYOUTS = {"padded": (False, False), "packed": (True, False), "prefix-shared": (False, True), "both": (True, True)}
BATCH = [6, 0, TIE, MISSING]


def scored_rows() -> list[dict]:
    rows = tiny.preference_rows(ROWS)
    for i, row in enumerate(rows):
        row["score_chosen"], row["score_rejected"] = 7.5 - i / 4, 2.0 + (i % 3) * 1.25
    rows[TIE]["score_rejected"] = rows[TIE]["score_chosen"]
    rows[MISSING]["score_rejected"] = None
    rows[DUPLICATE]["prompt"] = rows[1]["prompt"]
    return rows


def expected_scores(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The rows' scores as `prepare` stores them: float32, nan for a null."""
    return tuple(
        np.array([math.nan if r[key] is None else r[key] for r in rows], dtype=np.float32)
        for key in ("score_chosen", "score_rejected")
    )


@pytest.fixture(scope="module")
def scored(tiny_model_dir, tmp_path_factory) -> dict:
    """`scored_rows` prepared by `dpokit prepare` (train only) and their reference cache."""
    root = tmp_path_factory.mktemp("scored")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in scored_rows()))
    prompts = [row["prompt"] for i, row in enumerate(scored_rows()) if i != DUPLICATE]
    assert len(set(prompts)) == len(prompts)  # the planted duplicate is the only one
    prepared = root / "prepared"
    assert main(["prepare", str(data), "--model", str(tiny_model_dir), "--out", str(prepared)]) == 0
    cache = root / "ref.h5"
    assert main(ref_logps_args(prepared, tiny_model_dir, cache, "--batch-size", "4")) == 0
    loaded = load_prepared(prepared)
    assert loaded.has_scores and len(loaded.split("train")) == ROWS
    return {"root": root, "prepared": prepared, "cache": cache}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def batch_scores(indices: list[int]) -> np.ndarray:
    """``chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}`` of rows `indices`."""
    chosen, rejected = expected_scores(scored_rows())
    return np.concatenate([chosen[indices], rejected[indices]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_collate_puts_a_scored_pair_batchs_scores_in_slot_order_in_every_layout(scored, layout):
    split = load_prepared(scored["prepared"]).split("train")
    rows = example_rows(split, BATCH)
    assert {"chosen_score", "rejected_score"} <= set(rows[0])
    batch = collate_pairs(rows, BATCH, 0, *LAYOUTS[layout])
    assert not batch.is_grouped and batch.group_sizes is None
    np.testing.assert_array_equal(np.array(batch.scores, dtype=np.float32), batch_scores(BATCH))


@pytest.mark.parametrize("layout", ["padded", "prefix-shared"])
def test_the_policy_and_a_live_reference_carry_the_batchs_scores(scored, model, layout):
    split = load_prepared(scored["prepared"]).split("train")
    batch = collated(split, BATCH, 0, *LAYOUTS[layout], None)
    policy = concatenated_forward(model, batch)
    live = LiveReference(model, adapters_off=False, forward=concatenated_forward).outputs(batch, "train")
    chosen, rejected = expected_scores(scored_rows())
    for outputs in (policy, live):
        assert outputs.chosen_scores.dtype == torch.float32
        assert outputs.chosen_scores.device == outputs.chosen_logps.device
        np.testing.assert_array_equal(outputs.chosen_scores.numpy(), chosen[BATCH])
        np.testing.assert_array_equal(outputs.rejected_scores.numpy(), rejected[BATCH])


def test_the_cached_reference_carries_the_batchs_scores(scored, tiny_model_dir):
    prepared = load_prepared(scored["prepared"])
    batch = collated(prepared.split("train"), BATCH, 0, False, False, None)
    reference = CachedReference(str(scored["cache"]), prepared, str(tiny_model_dir), None, ["train"])
    outputs = reference.outputs(batch, "train")
    split = prepared.split("train")
    np.testing.assert_array_equal(outputs.chosen_scores.numpy(), np.float32(split["chosen_score"])[BATCH])
    np.testing.assert_array_equal(outputs.rejected_scores.numpy(), np.float32(split["rejected_score"])[BATCH])
    assert outputs.chosen_scores.device == outputs.chosen_logps.device


RECORDING_LOSS = """
from score_losses import ScoreWeightedDPO

SEEN = []


class RecordingScoreWeightedDPO(ScoreWeightedDPO):
    def forward(self, policy, reference):
        SEEN.append([side.tolist() for side in (policy.chosen_scores, policy.rejected_scores,
                                                 reference.chosen_scores, reference.rejected_scores)])
        return super().forward(policy, reference)
"""


def documented_score_loss() -> str:
    """docs/losses.md's ``score_losses.py`` block."""
    text = (REPO / "docs" / "losses.md").read_text()
    return re.search(r'^```python\n("""score_losses\.py:.*?)^```', text, flags=re.MULTILINE | re.DOTALL).group(1)


@pytest.mark.parametrize("source", ["cache", "live"])
def test_the_documented_score_weighted_loss_trains_a_step_on_the_scores(
    scored, tiny_model_dir, tmp_path, monkeypatch, source
):
    import importlib

    from dpokit.metrics import read_metrics

    (tmp_path / "score_losses.py").write_text(documented_score_loss())
    (tmp_path / "recording_losses.py").write_text(RECORDING_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("score_losses", "recording_losses"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    run = tmp_path / "run"
    on_cache = ("reference.source=cache", f"reference.cache={scored['cache']}") if source == "cache" else ()
    args = train_cli_args(
        tiny_model_dir,
        scored["prepared"],
        run,
        "--loss",
        "recording_losses:RecordingScoreWeightedDPO",
        "--max-steps",
        "1",
        "data.batch_size=8",
        *on_cache,
    )
    assert main(args) == 0
    seen = importlib.import_module("recording_losses").SEEN
    chosen, rejected, ref_chosen, ref_rejected = (np.array(side, dtype=np.float32) for side in seen[0])
    np.testing.assert_array_equal(ref_chosen, chosen)  # the reference's scores are the policy's
    np.testing.assert_array_equal(ref_rejected, rejected)
    stored = {(c, r) for c, r in zip(*(np.nan_to_num(s, nan=-1.0).tolist() for s in expected_scores(scored_rows())))}
    assert len(chosen) == 8 and all(
        pair in stored for pair in zip(chosen.tolist(), np.nan_to_num(rejected, nan=-1.0).tolist())
    )
    weight = np.nan_to_num(np.clip(chosen - rejected, 0, None), nan=1.0)
    # At step 0 the policy is the reference: every pair's DPO loss is ln 2, weighted by its score margin.
    assert read_metrics(run, "train")[0]["loss"] == pytest.approx(math.log(2) * weight.mean(), abs=1e-4)


@pytest.fixture(scope="module")
def audited(scored) -> dict:
    """`dpokit cache audit` of the scored cache, writing a copy without the duplicate prompt."""
    root = scored["root"]
    stdout = io.StringIO()
    args = ["cache", "audit", str(scored["cache"]), "--write-filtered", str(root / "clean"), "--drop", "dup-prompts"]
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return {"stdout": stdout.getvalue(), "audit": json.loads((root / "ref-audit" / "audit.json").read_text())}


def test_the_audit_reports_the_score_margin_its_correlation_and_ties(scored, audited):
    chosen, rejected = (values.astype(np.float64) for values in expected_scores(scored_rows()))
    with h5py.File(scored["cache"], "r") as handle:
        reference_margin = handle["train"]["chosen_logps"][()].astype(np.float64) - handle["train"]["rejected_logps"]
    both = np.array([i != MISSING for i in range(ROWS)])
    margin = (chosen - rejected)[both]
    got = audited["audit"]["splits"]["train"]["scores"]
    assert got["pairs"] == ROWS - 1
    assert got["ties"] == 1
    assert got["margin"]["mean"] == pytest.approx(margin.mean(), abs=1e-6)
    assert got["margin"]["std"] == pytest.approx(margin.std(), abs=1e-6)
    assert got["margin"]["min"] == pytest.approx(margin.min()) and got["margin"]["p50"] == pytest.approx(
        np.median(margin)
    )
    expected_r = np.corrcoef(margin, reference_margin[both])[0, 1]
    assert got["correlation_with_reference_margin"] == pytest.approx(expected_r, abs=1e-6)
    assert "score margin" in audited["stdout"]


def test_write_filtered_keeps_the_kept_rows_scores(scored, audited):
    clean = load_prepared(scored["root"] / "clean")
    kept = [i for i in range(ROWS) if i != DUPLICATE]
    chosen, rejected = expected_scores(scored_rows())
    split = clean.split("train")
    assert clean.has_scores and len(split) == len(kept)
    np.testing.assert_array_equal(np.float32(split["chosen_score"]), chosen[kept])
    np.testing.assert_array_equal(np.float32(split["rejected_score"]), rejected[kept])
    assert clean.manifest["splits"]["train"]["scores"] == {"present": len(kept) - 1}  # all but MISSING
    assert clean.manifest["scores"] == {"present": len(kept) - 1}
    batch = collated(split, [0, 1], 0, False, False, None)
    np.testing.assert_array_equal(np.float32(batch.scores), np.concatenate([chosen[kept][:2], rejected[kept][:2]]))


def test_pairs_without_scores_have_none_in_the_batch_outputs_and_audit(
    prepared_dir, ref_cache, tiny_model_dir, model, tmp_path
):
    from rich.console import Console

    prepared = load_prepared(prepared_dir)
    split = prepared.split("train")
    assert not prepared.has_scores and "chosen_score" not in example_rows(split, [0])[0]
    for packing, prefix_sharing in LAYOUTS.values():
        assert collated(split, [0, 1], 0, packing, prefix_sharing, None).scores is None
    batch = collated(split, [0, 1], 0, False, False, None)
    policy = concatenated_forward(model, batch)
    cached = CachedReference(str(ref_cache), prepared, str(tiny_model_dir), None, ["train"]).outputs(batch, "train")
    for outputs in (policy, cached):
        assert outputs.chosen_scores is None and outputs.rejected_scores is None
    record = run_audit(AuditOptions(cache=str(ref_cache), out=str(tmp_path / "audit")), Console(file=io.StringIO()))
    assert all("scores" not in summary for summary in record.record["splits"].values())
