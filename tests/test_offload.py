"""Activation offloading keeps parameters and small tensors on the device and moves only activations.

On CPU the "device" is the CPU itself, so the copies are real copies to fresh host tensors: enough to check
which tensors are offloaded and that backward gives the same gradients. The CUDA stream and pinned-memory
parts run only on a GPU.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from dpokit.data.collate import collate_pairs
from dpokit.logps import concatenated_forward
from dpokit.offload import ActivationOffloading

ROWS = [
    {"prompt_ids": [3, 40, 41, 42, 5, 4] * 4, "chosen_ids": [50, 51, 52, 5] * 4, "rejected_ids": [60, 5] * 4},
    {"prompt_ids": [3, 43, 5, 4] * 4, "chosen_ids": [53, 54, 55, 56, 57, 5] * 4, "rejected_ids": [61, 62, 5] * 4},
]


def gradients(model, context):
    model.zero_grad()
    batch = collate_pairs(ROWS, [0, 1], 0, packing=True, prefix_sharing=True)
    with context:
        out = concatenated_forward(model, batch)
    (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_offloading_moves_activations_not_weights_and_changes_no_gradient(tiny_model_dir):
    import contextlib

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = gradients(model, contextlib.nullcontext())
    everything = ActivationOffloading(model, torch.device("cpu"), min_bytes=0)
    moved = gradients(model, everything)
    assert moved.keys() == plain.keys() and all(torch.equal(moved[name], plain[name]) for name in plain)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert everything.offloaded_bytes > 0 and everything.kept_bytes >= weight_bytes / 2  # linears' saved weights stay


def test_parameters_their_views_and_small_tensors_stay_and_activations_go(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    offload = ActivationOffloading(model, torch.device("cpu"), min_bytes=4096)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert offload.stays(weight) and offload.stays(weight.t())  # a parameter, and a view of its storage
    assert offload.stays(torch.zeros(1023))  # 4,092 bytes: under the floor
    assert not offload.stays(torch.zeros(1024))  # an activation of 4,096 bytes goes
    assert offload.stays(torch.zeros(4096, device="meta"))  # another device's tensor is not this one's to move
