"""A prototype, not a feature: dpokit training steps with every float32 linear product on CPU sent to oneDNN.

bench/gemm_backend_results.md measures oneDNN's float32 products 2-2.5x faster than torch's (MKL) on this
AMD CPU, and finds that ``torch.ops.mkldnn._linear_pointwise`` (the op Inductor uses) takes plain tensors, so
no format conversion is needed. This script patches, in its own process only, ``nn.Linear.forward`` (float32 on
CPU, outside autocast) and the fused head's three products (`dpokit.logps.project`, `input_gradient`,
`weight_gradient`) to use that op, then runs `dpokit train` on a workload made by ``bench/train_bench.py`` and
reports the median step and the peak resident set. ``--backend torch`` runs the same without the patch.

    python bench/train_bench.py --quick --shape short --workdir /tmp/ab      # once, for the workload
    python bench/onednn_step_bench.py --workdir /tmp/ab --method full --backend onednn --steps 30
"""

from __future__ import annotations

import argparse
import resource
import statistics
from pathlib import Path

from train_bench import child_dpokit  # bench/ is on sys.path when this script runs


def linear_pointwise(x, weight, bias=None):
    """``x @ weight.T + bias`` by oneDNN, on plain (strided) tensors."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def install_onednn() -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import dpokit.logps

    class OneDNNLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            flat = x.reshape(-1, x.shape[-1])
            ctx.save_for_backward(flat, weight)
            ctx.shape, ctx.has_bias = x.shape, bias is not None
            return linear_pointwise(flat, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            flat, weight = ctx.saved_tensors
            grad = grad.reshape(-1, grad.shape[-1])
            grad_x = linear_pointwise(grad, weight.t()).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
            grad_w = linear_pointwise(grad.t(), flat.t()) if ctx.needs_input_grad[1] else None
            grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return grad_x, grad_w, grad_b

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    nn.Linear.forward = forward
    dpokit.logps.project = linear_pointwise  # the fused head's three products
    dpokit.logps.input_gradient = lambda grad_logits, weight: linear_pointwise(grad_logits, weight.t())
    dpokit.logps.weight_gradient = lambda grad_logits, hidden: linear_pointwise(grad_logits.t(), hidden.t())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a bench/train_bench.py --workdir")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--backend", choices=["torch", "onednn"], default="onednn")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from dpokit.host_memory import configure_host_memory

    configure_host_memory()  # as the `dpokit` command does, before the patch imports torch
    if args.backend == "onednn":
        install_onednn()
    work = args.workdir
    clock = child_dpokit([  # `dpokit train` in this process, its step ends and losses recorded
        f"data.path={work / 'prepared'}", f"model.path={work / 'model'}", f"reference.cache={work / 'ref.h5'}",
        f"model.method={args.method}", "model.dtype=float32", "data.batch_size=4", f"training.max_steps={args.steps}",
        "optimizer.lr=5e-6", "loss.beta=0.1", "lora.rank=8", "lora.alpha=16", "training.seed=42",
        "distributed.cpu_threads=1", f"output.dir={work / 'runs' / f'onednn-{args.method}-{args.backend}'}",
        "output.overwrite=true"])
    ends, losses = clock["ends"], clock["losses"]
    steps = [b - a for a, b in zip(ends, ends[1:])][3:]  # the first steps warm up
    print(f"{args.method} {args.backend}: median step {1000 * statistics.median(steps):.1f} ms, "
          f"{4 / statistics.mean(steps):.2f} pairs/s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"losses {losses[0]:.6f} ... {losses[-1]:.6f}")


if __name__ == "__main__":
    main()
