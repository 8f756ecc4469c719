"""Each library kernel against eager PyTorch and torch.compile of the same computation (CUDA).

    python bench/kernels/bench_kernels.py            # writes bench/kernels/results_<gpu>.csv/.md

Times are `triton.testing.do_bench` medians (it zeroes a 256 MB buffer before every rep, so L2 is
cold), fp32 inputs, strict policy for the GEMM (tf32x3 vs cuBLAS fp32). Every kernel's output is
checked against the eager result before it is timed.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hetforge.kernels.triton.epilogue import Op  # noqa: E402
from hetforge.kernels.triton.gemm_epilogue import gemm_epilogue  # noqa: E402
from hetforge.kernels.triton.norm import fused_norm  # noqa: E402
from hetforge.kernels.triton.pointwise import pointwise_chain  # noqa: E402
from hetforge.kernels.triton.reduce import fused_reduce  # noqa: E402
from hetforge.kernels.triton.softmax import fused_softmax  # noqa: E402


def cases():
    dev = "cuda"
    for m, k, n in ((4096, 4096, 4096), (8192, 1024, 4096), (1024, 8192, 8192), (128, 4096, 4096)):
        x, w, b = torch.randn(m, k, device=dev), torch.randn(n, k, device=dev), torch.randn(n, device=dev)
        wt = w.t().contiguous()
        yield (
            f"gemm_epilogue {m}x{k}x{n} +relu*2",
            lambda x=x, w=w, b=b: torch.relu(F.linear(x, w, b)) * 2.0,
            lambda x=x, wt=wt, b=b: gemm_epilogue(x, wt, b, (Op("relu"), Op("mul", 2.0))),
            1e-4,
        )
    for rows, cols in ((65536, 8192), (16384, 1024), (4096, 50000)):
        x = torch.randn(rows, cols, device=dev)
        w, b = torch.randn(cols, device=dev), torch.randn(cols, device=dev)
        yield (
            f"layer_norm+gelu {rows}x{cols}",
            lambda x=x, w=w, b=b: F.gelu(F.layer_norm(x, (x.shape[-1],), w, b)),
            lambda x=x, w=w, b=b: fused_norm(x, "layer", w, b, 1e-5, epilogue=(Op("gelu"),)),
            1e-4,
        )
        yield (
            f"rms_norm {rows}x{cols}",
            lambda x=x, w=w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
            lambda x=x, w=w: fused_norm(x, "rms", w, None, 1e-6),
            1e-4,
        )
        yield (
            f"softmax(x*0.125) {rows}x{cols}",
            lambda x=x: torch.softmax(x * 0.125, -1),
            lambda x=x: fused_softmax(x, "softmax", 0.125),
            1e-5,
        )
        yield (
            f"logsumexp {rows}x{cols}",
            lambda x=x: torch.logsumexp(x, -1),
            lambda x=x: fused_softmax(x, "logsumexp"),
            1e-4,
        )
    g = torch.randn(32, 256, 64, 64, device=dev)
    gw, gb = torch.randn(256, device=dev), torch.randn(256, device=dev)
    yield (
        "group_norm+silu 32x256x64x64",
        lambda: F.silu(F.group_norm(g, 32, gw, gb)),
        lambda: fused_norm(g, "group", gw, gb, 1e-5, groups=32, epilogue=(Op("silu"),)),
        1e-4,
    )
    x, y = torch.randn(1 << 27, device=dev), torch.randn(1 << 27, device=dev)
    chain = (
        Op("mul", 1.5),
        Op("add", 0.25),
        Op("sigmoid"),
        Op("mul_r"),
        Op("add", -0.5),
        Op("tanh"),
        Op("abs"),
        Op("mul", 3.0),
    )
    yield (
        "pointwise chain x8 2^27",
        lambda: torch.tanh(torch.sigmoid(x * 1.5 + 0.25) * y - 0.5).abs() * 3.0,
        lambda: pointwise_chain(x, chain, r=y),
        1e-5,
    )
    c = torch.randn(64, 256, 128, 128, device=dev)
    yield (
        "relu(x).sum(dim=1) 64x256x128x128",
        lambda: torch.relu(c).sum(1),
        lambda: fused_reduce(c, "sum", 1, False, (Op("relu"),)),
        1e-3,
    )
    yield (
        "sigmoid(x).mean(-1) 64x256x128x128",
        lambda: torch.sigmoid(c).mean(-1),
        lambda: fused_reduce(c, "mean", -1, False, (Op("sigmoid"),)),
        1e-4,
    )


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # strict fp32 baseline, as the verifier's strict policy
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(0)
    rows = []
    for label, eager, ours, tol in cases():
        ref = eager()
        got = ours()
        err = ((got - ref).abs() / (ref.abs() + 1)).max().item()
        ok = err <= tol * 10
        compiled = torch.compile(eager)
        t_eager, t_compile, t_ours = (do_bench(f, warmup=10, rep=50) for f in (eager, compiled, ours))
        rows.append(
            {
                "kernel": label,
                "eager_ms": round(t_eager, 4),
                "compile_ms": round(t_compile, 4),
                "hetforge_ms": round(t_ours, 4),
                "vs_eager": round(t_eager / t_ours, 3),
                "vs_compile": round(t_compile / t_ours, 3),
                "max_err": f"{err:.2e}",
                "correct": ok,
            }
        )
        print(rows[-1], flush=True)
        torch._dynamo.reset()
    tag = name.split()[1].lower() if len(name.split()) > 1 else "gpu"
    out = Path(__file__).resolve().parent
    with (out / f"results_{tag}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Library kernels on {name} (torch {torch.__version__}, triton {triton.__version__})",
        "",
        "| kernel | eager ms | torch.compile ms | hetforge ms | vs eager | vs compile | max rel err | correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kernel']} | {r['eager_ms']} | {r['compile_ms']} | {r['hetforge_ms']} | {r['vs_eager']}x | {r['vs_compile']}x | {r['max_err']} | {r['correct']} |"
        for r in rows
    ]
    (out / f"results_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
