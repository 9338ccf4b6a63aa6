"""Activation offloading (``model.activation_offloading``): what autograd saves for backward waits in host memory.

``torch.autograd.graph.save_on_cpu`` copies every saved tensor, synchronously: the weights each linear saves
too (about 16 GB device -> host and back per micro-step for an 8B LoRA run), and tiny tensors whose copy costs
more than it saves. As torchtune's offloading does, this copies only what is worth it:

- parameters (and tensors sharing a parameter's storage, such as FSDP2's gathered weights) stay where they are:
  they live on the device anyway;
- tensors under `MIN_OFFLOAD_BYTES` stay;
- on CUDA the copies to pinned host memory run on a side stream, so the forward does not wait for them, and
  backward's copy back waits only for its own tensor's copy (an event per tensor).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20  # smaller tensors stay on the device: their copy costs more than they take


class ActivationOffloading(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of `device` of at least `min_bytes`, other than `model`'s parameters, kept in host memory
    until backward needs them. ``offloaded_bytes`` and ``kept_bytes`` count what it did (for tests and plans)."""

    def __init__(self, model: nn.Module, device: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.device = device
        self.min_bytes = min_bytes
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device == device}
        self.cuda = device.type == "cuda"
        self.stream: Optional[Any] = torch.cuda.Stream(device) if self.cuda else None
        self.offloaded_bytes = 0
        self.kept_bytes = 0
        super().__init__(self.pack, self.unpack)

    def stays(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is kept where it is (not this device's, a parameter's storage, or small)."""
        if tensor.device != self.device or tensor.layout != torch.strided:
            return True
        if isinstance(tensor, nn.Parameter) or tensor.untyped_storage().data_ptr() in self.parameter_storages:
            return True
        return tensor.numel() * tensor.element_size() < self.min_bytes

    def pack(self, tensor: torch.Tensor) -> Any:
        size = tensor.numel() * tensor.element_size()
        if self.stays(tensor):
            self.kept_bytes += size
            return tensor
        self.offloaded_bytes += size
        if not self.cuda:
            return (tensor.device, tensor.to("cpu", copy=True), None)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is computed
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return (tensor.device, host, copied)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        if copied is None:
            return host.to(device)
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


def activation_offloading(enabled: bool, device: torch.device, model: nn.Module):
    """The context the policy's training forward runs in: `ActivationOffloading` with ``model.activation_offloading``
    on CUDA. On CPU the activations already live in host memory: nothing to do."""
    if enabled and device.type == "cuda":
        return ActivationOffloading(model, device)
    return contextlib.nullcontext()
