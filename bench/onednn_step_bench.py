"""A prototype, not a feature: dpokit training steps with every float32 linear product on CPU sent to oneDNN.

bench/gemm_backend_results.md measures oneDNN's float32 products 2-2.5x faster than torch's (MKL) on this
AMD CPU, and finds that ``torch.ops.mkldnn._linear_pointwise`` (the op Inductor uses) takes plain tensors, so
no format conversion is needed. This script patches, in its own process only, ``nn.Linear.forward`` (float32 on
CPU, outside autocast) and the fused head (`dpokit.logps.FusedChunkLogps`) to do their forward and both
backward products with that op, then runs `dpokit train` on a workload made by ``bench/train_bench.py`` and
reports the median step and the peak resident set. ``--backend torch`` runs the same without the patch.

    python bench/train_bench.py --quick --shape short --workdir /tmp/ab      # once, for the workload
    python bench/onednn_step_bench.py --workdir /tmp/ab --method full --backend onednn --steps 30
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path


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

    class FusedChunkLogps(dpokit.logps.FusedChunkLogps):  # the library's, with oneDNN's products
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, keep_softmax=False):
            logits = linear_pointwise(hidden, weight, bias)
            normaliser = torch.logsumexp(logits, dim=-1)
            token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
            mean_logits = logits.mean(dim=-1)
            ctx.keep_softmax = keep_softmax
            kept = logits.sub_(normaliser.unsqueeze(-1)).exp_() if keep_softmax else normaliser
            ctx.save_for_backward(hidden, weight, bias, targets, kept)
            return token_logps, mean_logits

        @staticmethod
        def backward(ctx, grad_logps, grad_mean_logits):
            hidden, weight, bias, targets, saved = ctx.saved_tensors
            if ctx.keep_softmax:
                grad_logits = saved.mul_(-grad_logps.unsqueeze(-1))
            else:
                logits = linear_pointwise(hidden, weight, bias)
                grad_logits = torch.exp(logits.sub_(saved.unsqueeze(-1))).mul_(-grad_logps.unsqueeze(-1))
            grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))
            grad_hidden = linear_pointwise(grad_logits, weight.t()) if ctx.needs_input_grad[0] else None
            grad_weight = linear_pointwise(grad_logits.t(), hidden.t()) if ctx.needs_input_grad[1] else None
            grad_bias = grad_logits.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
            return grad_hidden, grad_weight, grad_bias, None, None

    nn.Linear.forward = forward
    dpokit.logps.FusedChunkLogps = FusedChunkLogps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a bench/train_bench.py --workdir")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--backend", choices=["torch", "onednn"], default="onednn")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from dpokit.host_memory import configure_host_memory

    configure_host_memory()  # as the `dpokit` command does, before torch is imported
    import torch

    torch.set_num_threads(1)
    import dpokit.cli
    from dpokit import metrics

    if args.backend == "onednn":
        install_onednn()
    ends, losses = [], []
    log = metrics.MetricsLogger.log

    def timed_log(self, step, split, values):
        if split == "train":
            ends.append(time.perf_counter())
            losses.append(values["loss"])
        log(self, step, split, values)

    metrics.MetricsLogger.log = timed_log
    dpokit.cli.own_process = True
    work = args.workdir
    code = dpokit.cli.main([
        "train", f"data.path={work / 'prepared'}", f"model.path={work / 'model'}", f"reference.cache={work / 'ref.h5'}",
        f"model.method={args.method}", "model.dtype=float32", "data.batch_size=4", f"training.max_steps={args.steps}",
        "optimizer.lr=5e-6", "loss.beta=0.1", "lora.rank=8", "lora.alpha=16", "training.seed=42",
        f"output.dir={work / 'runs' / f'onednn-{args.method}-{args.backend}'}", "output.overwrite=true"])
    if code != 0:
        sys.exit(code)
    steps = [b - a for a, b in zip(ends, ends[1:])][3:]  # the first steps warm up
    print(f"{args.method} {args.backend}: median step {1000 * statistics.median(steps):.1f} ms, "
          f"{4 / statistics.mean(steps):.2f} pairs/s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"losses {losses[0]:.6f} ... {losses[-1]:.6f}")


if __name__ == "__main__":
    main()
