"""The recipe's API: an ejected recipe imports dpokit only through `dpokit.recipe_api`, and setup's order is checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dpokit.recipe_api as api
from dpokit.recipe_api import SetupOrder

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "dpo.py"


def _dpokit_imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpokit"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("dpokit")]
    return found


def test_the_recipe_imports_dpokit_only_through_the_recipe_api():
    imports = _dpokit_imports(RECIPE)
    assert [module for module, _ in imports] == ["dpokit.recipe_api"]
    used = set(imports[0][1])
    assert used <= set(api.__all__)


def test_every_name_the_api_promises_exists_and_the_recipe_uses_most_of_them():
    for name in api.__all__:
        assert hasattr(api, name), name
    assert len(set(api.__all__)) == len(api.__all__)
    used = set(_dpokit_imports(RECIPE)[0][1])
    unused = set(api.__all__) - used
    # debug: for recipes that add their own lines at the debug level; chosen_rejected_outputs: what recipes ejected
    # before ranked data call (batch_outputs does it for pairs and ranked groups alike); extra_of, missing_trackers:
    # what recipes ejected while TensorBoard was the default tracker call; all kept by the stability promise
    assert unused <= {"debug", "chosen_rejected_outputs", "extra_of", "missing_trackers"}, unused


def test_the_recipes_three_forward_calls_give_the_models_own_log_probs(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from dpokit.data.collate import collate_pairs, pad_pairs
    from dpokit.logps import naive_sequence_logps
    from dpokit.recipe_api import chosen_rejected_outputs, decoder_hidden_states, head_logps

    rows = [
        {"prompt_ids": [3, 40, 41, 42, 5, 4], "chosen_ids": [50, 51, 52, 5], "rejected_ids": [60, 5]},
        {"prompt_ids": [3, 43, 5, 4], "chosen_ids": [53, 54, 55, 56, 57, 5], "rejected_ids": [61, 62, 5]},
    ]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate_pairs(rows, [0, 1], pad_id=0, packing=True, prefix_sharing=True)
    with torch.no_grad():
        hidden, aux = decoder_hidden_states(model, batch)  # as the recipe's policy_logps
        out = chosen_rejected_outputs(head_logps(model, hidden, batch, chunk_size=3), batch.num_pairs)
        padded = pad_pairs(rows, [0, 1], pad_id=0)
        expected = naive_sequence_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
    assert aux is None and hidden.shape[:2] == batch.input_ids.shape
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]), expected, atol=1e-4, rtol=0)
    assert out.chosen_tokens.tolist() == [4, 6] and out.rejected_tokens.tolist() == [2, 3]


def test_setup_order_refuses_a_step_moved_before_what_it_needs():
    order = SetupOrder()
    order.done("trackers_checked")
    order.require("load_policy", "trackers_checked")
    with pytest.raises(RuntimeError, match=r"setup\(\): compile must come after layout \(the layout check compares"):
        order.require("compile", "layout")
    order.done("layout")
    order.require("compile", "layout")
    with pytest.raises(
        RuntimeError, match=r"clear_old_run must come after reference, step_zero \(a refused --overwrite"
    ):
        order.require("clear_old_run", "reference", "step_zero")
