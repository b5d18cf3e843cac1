"""One segment's causal attention on the CPU: PyTorch's flash kernel against zerotune's chunked matmul path.

    python -m benchmarks.attention                 # SmolLM2-135M's shape (9 query heads, 3 key/value, dim 64), bf16
    python -m benchmarks.attention --dtype float32

Forward + backward of one segment at each length, the median of --repeat runs each, with freed host memory
kept (trainer.engine.host_memory, as training runs). Errors are the largest absolute difference of the output
and the query/key/value gradients from an fp32 computation of the same attention (SDPA in fp32). Writes
benchmarks/results/attention.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from trainer.engine.host_memory import keep_freed_memory
    from trainer.model import cpu_attention

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lengths", default="64,128,256,384,512,768,1024,1536,2048")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/attention.md"))
    args = parser.parse_args()
    keep_freed_memory(on_cpu=True)
    dtype = getattr(torch, args.dtype)
    scale = args.dim ** -0.5
    torch.manual_seed(0)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(args.heads, n, args.dim, dtype=dtype, requires_grad=True)
        k = torch.randn(args.kv_heads, n, args.dim, dtype=dtype, requires_grad=True)
        v = torch.randn(args.kv_heads, n, args.dim, dtype=dtype, requires_grad=True)
        grad = torch.randn(args.heads, n, args.dim, dtype=dtype)

        def flash(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                  enable_gqa=True)[0]

        def chunked(q=q, k=k, v=v):
            return cpu_attention.attention(q, k, v, scale)

        exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*(t[None] for t in exact), is_causal=True, scale=scale, enable_gqa=True)[0]
        ref.backward(grad.double())
        errors, seconds = {}, {}
        for name, fn in (("flash", flash), ("chunked", chunked)):
            for t in (q, k, v):
                t.grad = None
            out = fn()
            out.backward(grad)
            errors[name] = max((a.double() - b).abs().max().item()
                               for a, b in zip((out, q.grad, k.grad, v.grad), (ref, *(t.grad for t in exact))))
            seconds[name] = timed(lambda fn=fn: fn().backward(grad), args.repeat)
        flops = 3.5 * 4 * n * n * args.dim * args.heads / 2  # causal forward is 4 n^2 d h / 2; backward 2.5x that
        rows.append((n, seconds["flash"] * 1e3, seconds["chunked"] * 1e3, seconds["flash"] / seconds["chunked"],
                     flops / seconds["chunked"] / 1e9, errors["flash"], errors["chunked"]))
        print(f"  {n}: flash {rows[-1][1]:.2f} ms, chunked {rows[-1][2]:.2f} ms", flush=True)
    lines = [f"{args.heads} query heads, {args.kv_heads} key/value heads, head dim {args.dim}, {args.dtype}, "
             f"{torch.get_num_threads()} threads; forward + backward of one causal segment.", "",
             "| length | flash ms | chunked ms | speedup | chunked GFLOP/s | flash max error | chunked max error |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {f:.2f} | {c:.2f} | {s:.2f}x | {g:.0f} | {ef:.4f} | {ec:.4f} |"
              for n, f, c, s, g, ef, ec in rows]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
