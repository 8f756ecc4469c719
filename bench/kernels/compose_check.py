"""The library's modules under torch.compile(fullgraph=True) against the same modules in eager (CUDA).

    PYTHONPATH=. python bench/kernels/compose_check.py                  # CUDA: fp32, tf32, bf16
    PYTHONPATH=. python bench/kernels/compose_check.py --device cpu     # smoke: the torch paths
    TRITON_INTERPRET=1 HETFORGE_KERNELS_ON_CPU=1 PYTHONPATH=. python bench/kernels/compose_check.py --device cpu
                                                                        # the custom ops, kernels interpreted

What `compose:library+compile*` variants do: each module of `hetforge/kernels/modules.py` (and a
tiny BERT-like block built from them) runs eagerly, then compiled with fullgraph=True (a graph
break raises), both under inference_mode; the outputs must agree within the precision's tolerance.
`ops` counts the `torch.ops.hetforge.*` calls in the compiled graph (0 where the kernels do not run:
there the modules hand Inductor their torch paths). Exit status 1 if any row fails. Prints one row
per (precision, case), the table last. No timings: bench_kernels.py times the kernels.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback

import torch
import torch.nn as nn
import triton
from torch._dynamo.testing import CompileCounterWithBackend

from hetforge.kernels.modules import (
    FusedBmm,
    FusedConv,
    FusedLinear,
    FusedNorm,
    FusedReduce,
    FusedSoftmax,
    PointwiseChain,
)
from hetforge.kernels.triton.epilogue import Op

# precision -> (dtype, library precision policy, TF32 allowed in torch's own GEMMs/convolutions, atol, rtol).
# Where the kernels run, eager and compiled calls run the same kernels and differ only in the glue
# Inductor recomputes (reshapes, splits, transposes). Where they do not (the CPU), Inductor compiles the
# torch paths and keeps bf16 intermediates in fp32 where eager rounds after each op: about one bf16
# ulp apart (0.03 at magnitude 4-8 measured on the CPU smoke run), hence bf16's atol.
PRECISIONS = {
    "fp32": (torch.float32, "strict", False, 1e-5, 1e-5),
    "tf32": (torch.float32, "tf32", True, 1e-4, 1e-4),
    "bf16": (torch.bfloat16, "bf16", False, 5e-2, 2e-2),
}
HIDDEN, HEADS, SEQ, BATCH = 128, 4, 64, 2


class TinyBlock(nn.Module):
    """A BERT encoder layer from library modules: pre-norm attention, then a GELU MLP, residuals in the GEMMs."""

    def __init__(self, dtype: torch.dtype, precision: str):
        super().__init__()
        h, d = HIDDEN, HIDDEN // HEADS

        def w(*shape):
            return (torch.randn(*shape) / math.sqrt(shape[-1])).to(dtype)

        self.ln1 = FusedNorm("layer", torch.ones(h, dtype=dtype), torch.zeros(h, dtype=dtype))
        self.qkv = FusedLinear(w(3 * h, h), w(3 * h), precision=precision)
        self.scores = FusedBmm((Op("mul", 1 / math.sqrt(d)),), precision=precision)
        self.softmax = FusedSoftmax()
        self.context = FusedBmm(precision=precision)
        self.out = FusedLinear(w(h, h), w(h), (Op("add_r"),), precision=precision)
        self.ln2 = FusedNorm("layer", torch.ones(h, dtype=dtype), torch.zeros(h, dtype=dtype))
        self.up = FusedLinear(w(4 * h, h), w(4 * h), (Op("gelu"),), precision=precision)
        self.down = FusedLinear(w(h, 4 * h), w(h), (Op("add_r"),), precision=precision)

    def forward(self, x):  # x: [B, S, H]
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)

        def heads(t):  # [B, S, H] -> [B * heads, S, H / heads]
            return t.reshape(b, s, HEADS, h // HEADS).transpose(1, 2).reshape(b * HEADS, s, h // HEADS)

        p = self.softmax(self.scores(heads(q), heads(k).transpose(1, 2)))
        ctx = self.context(p, heads(v)).reshape(b, HEADS, s, h // HEADS).transpose(1, 2).reshape(b, s, h)
        x = self.out(ctx, residual=x)
        return self.down(self.up(self.ln2(x)), residual=x)


class Call(nn.Module):
    """`module(*args)` with the extra arguments kept as buffers, so the compiled module takes one input."""

    def __init__(self, module: nn.Module, *args: torch.Tensor):
        super().__init__()
        self.module = module
        for i, a in enumerate(args):
            self.register_buffer(f"arg{i}", a)
        self.n = len(args)

    def forward(self, x):
        return self.module(x, *(getattr(self, f"arg{i}") for i in range(self.n)))


def cases(dtype: torch.dtype, precision: str, device: str):
    """(name, module, input) for each library module and the block."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x = randn(BATCH, SEQ, HIDDEN)
    yield "FusedLinear +gelu", FusedLinear(randn(256, HIDDEN), randn(256), (Op("gelu"),), precision=precision), x
    yield (
        "FusedLinear +bias_v+add_r",
        Call(
            FusedLinear(randn(HIDDEN, HIDDEN), None, (Op("add_v"), Op("add_r")), randn(HIDDEN), precision=precision),
            randn(BATCH, SEQ, HIDDEN),
        ),
        x,
    )
    yield (
        "FusedBmm *scale",
        Call(FusedBmm((Op("mul", 0.125),), precision=precision), randn(8, 32, 48)),
        randn(8, SEQ, 32),
    )
    yield "FusedNorm layer", FusedNorm("layer", randn(HIDDEN), randn(HIDDEN)), x
    yield "FusedNorm rms +silu", FusedNorm("rms", randn(HIDDEN), None, 1e-6, epilogue=(Op("silu"),)), x
    yield "FusedNorm group", FusedNorm("group", randn(32), randn(32), groups=4), randn(BATCH, 32, 7, 5)
    yield "FusedSoftmax *scale", FusedSoftmax("softmax", 0.5), x
    yield "FusedSoftmax logsumexp", FusedSoftmax("logsumexp", 1.0, keepdim=True), x
    yield "PointwiseChain", PointwiseChain((Op("mul", 2.0), Op("gelu_tanh"), Op("add", 1.0))), x
    yield "FusedReduce mean", FusedReduce("mean", 1, False, (Op("abs"),)), x
    if dtype == torch.float32:  # FusedConv takes fp32 convolutions; split = the strict policy's TF32x3 path
        conv = nn.Conv1d(32, 64, 3, padding=1).to(dtype)
        yield "FusedConv1d +relu", FusedConv(conv, (Op("relu"),), split=precision == "strict"), randn(BATCH, 32, 40)
    torch.manual_seed(0)
    yield "block (BERT-like)", TinyBlock(dtype, precision), x


def check(name, module, x, device, atol, rtol) -> dict:
    module = module.to(device).eval()
    x = x.to(device)
    row = {"case": name, "ops": "-", "max_abs": float("nan"), "ok": False, "error": ""}
    torch._dynamo.reset()  # each case compiles afresh: modules of one class would hit the recompile limit
    try:
        with torch.inference_mode():
            expected = module(x)
            counter = CompileCounterWithBackend("inductor")
            compiled = torch.compile(module, backend=counter, fullgraph=True)
            got = compiled(x)
            got = compiled(x)  # a second call runs the compiled graph alone (the first also compiles)
        row["ops"] = sum(str(n.target).startswith("hetforge.") for gm in counter.graphs for n in gm.graph.nodes)
        row["max_abs"] = (got.float() - expected.float()).abs().max().item()
        row["ok"] = bool(torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol))
        if not row["ok"]:
            row["error"] = f"outside atol={atol:g} rtol={rtol:g}"
    except Exception as e:  # a failing case is a row of the table, not the end of the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        traceback.print_exc(limit=3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp32,tf32,bf16")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke run", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for prec in args.precisions.split(","):
        dtype, policy, tf32, atol, rtol = PRECISIONS[prec]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        for name, module, x in cases(dtype, policy, args.device):
            row = {"precision": prec, **check(name, module, x, args.device, atol, rtol)}
            print(row, flush=True)
            rows.append(row)
    print()
    print("| precision | case | hetforge ops in graph | max abs diff | result |")
    print("|---|---|---|---|---|")
    for r in rows:
        result = "pass" if r["ok"] else f"FAIL {r['error']}"
        print(f"| {r['precision']} | {r['case']} | {r['ops']} | {r['max_abs']:.2e} | {result} |")
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
