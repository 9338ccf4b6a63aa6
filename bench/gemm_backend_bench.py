"""The vocabulary projection's three products on CPU: torch's float32 GEMM (MKL) against oneDNN's.

A short-pair training step is mostly these products (bench/RESULTS.md, "Host memory settings"). torch sends a
float32 ``mm`` on x86 to MKL; oneDNN is reachable through ``Tensor.to_mkldnn`` and the op behind
``torch.utils.mkldnn.MkldnnLinear``. This measures both, one thread, at the shapes of a short-pair step
(M completion tokens, hidden H, vocabulary V), with oneDNN's format conversions timed separately, and how far
the results are apart (both are float32 products; the summation order differs).

    python bench/gemm_backend_bench.py [--tokens 96] [--hidden 256] [--vocab 32000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import time

import torch


def timed_ms(fn, repeat: int) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def onednn_linear(x_mkldnn, w_mkldnn):
    """x @ w.T through oneDNN (both already in its format)."""
    return torch._C._nn.mkldnn_linear(x_mkldnn, w_mkldnn, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, h, v = args.tokens, args.hidden, args.vocab
    hidden, weight, grad = torch.randn(m, h), torch.randn(v, h) * 0.02, torch.randn(m, v) * 1e-3
    products = {  # name: (plain, oneDNN operands (x, w) with x @ w.T the same product)
        "logits = hidden @ W.T  [M,H]x[H,V]": (lambda: hidden @ weight.t(), (hidden, weight)),
        "grad_hidden = G @ W  [M,V]x[V,H]": (lambda: grad @ weight, (grad, weight.t())),
        "grad_W = G.T @ hidden  [V,M]x[M,H]": (lambda: grad.t() @ hidden, (grad.t(), hidden.t())),
    }
    print(f"M={m} H={h} V={v}, one thread, torch {torch.__version__}, mkldnn {torch.backends.mkldnn.is_available()}")
    print("| product | torch (MKL) ms | oneDNN ms | oneDNN + conversions ms | max abs difference |")
    print("|---|---:|---:|---:|---:|")
    for name, (plain, (x, w)) in products.items():
        xm, wm = x.contiguous().to_mkldnn(), w.contiguous().to_mkldnn()
        reference = plain()
        other = onednn_linear(xm, wm).to_dense()
        print(f"| {name} | {timed_ms(plain, args.repeat):.2f} | {timed_ms(lambda: onednn_linear(xm, wm), args.repeat):.2f} | "
              f"{timed_ms(lambda: onednn_linear(x.contiguous().to_mkldnn(), w.contiguous().to_mkldnn()).to_dense(), args.repeat):.2f} | "
              f"{(reference - other).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
