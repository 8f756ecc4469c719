"""The library's entry points as custom ops (`torch.ops.hetforge.*`): torch.compile(fullgraph=True) of each
matches eager with the op in the graph, `torch.library.opcheck` passes on each op, library modules compile
without a graph break, and registration survives a module executed twice and a forked worker.

"kernels": the Triton kernels run (CUDA, or the CPU under Triton's interpreter), so calls go through the ops;
"torch": CPU tensors take the torch paths, which torch.compile traces as plain torch ops (no hetforge op).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

from hetforge.kernels.modules import FusedBmm, FusedLinear, FusedNorm, FusedReduce, FusedSoftmax, PointwiseChain
from hetforge.kernels.triton import custom_ops
from hetforge.kernels.triton.configs import runs_triton
from hetforge.kernels.triton.epilogue import CODES, TAKES_SCALAR, Op, decode, encode
from hetforge.kernels.triton.gemm_epilogue import bmm_epilogue, gemm_epilogue, split_tf32
from hetforge.kernels.triton.norm import fused_norm
from hetforge.kernels.triton.pointwise import pointwise_chain
from hetforge.kernels.triton.reduce import fused_reduce
from hetforge.kernels.triton.softmax import fused_softmax
from tests.conftest import REPO

CHAIN = (Op("mul", 0.5), Op("gelu"), Op("add_v"), Op("add_r"))


@pytest.fixture(params=["kernels", "torch"])
def device(request) -> str:
    """The device the test's tensors live on; "kernels" makes the Triton kernels run on it."""
    torch._dynamo.reset()  # a fresh Dynamo cache: the same test functions are compiled under both params
    return request.getfixturevalue("triton_on_cpu") if request.param == "kernels" else "cpu"


def _kernels_run(device: str) -> bool:
    return runs_triton(torch.empty(0, device=device))


def _randn(device, *shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))).to(device)


def entry_points(device):
    """name of the op -> (a function calling the public entry point, its tensor arguments)."""
    x = _randn(device, 2, 5, 7)
    w_hi, w_lo = split_tf32(_randn(device, 7, 9))
    return {
        "gemm_epilogue": (
            lambda x, w, b, v, r: gemm_epilogue(x, w, b, CHAIN, v, r),
            (x, _randn(device, 7, 9), _randn(device, 9), _randn(device, 9), _randn(device, 2, 5, 9)),
        ),
        "gemm_epilogue (split weight)": (
            lambda x, hi, lo: gemm_epilogue(x, hi, None, (Op("relu"),), w_lo_t=lo),
            (x, w_hi, w_lo),
        ),
        "bmm_epilogue": (
            lambda a, b, v: bmm_epilogue(a, b.transpose(1, 2), (Op("mul", 0.25), Op("sub_v")), v),
            (_randn(device, 3, 5, 7), _randn(device, 3, 6, 7), _randn(device, 6)),
        ),
        "fused_norm": (
            lambda x, w, b, r: fused_norm(x, "layer", w, b, 1e-5, epilogue=(Op("silu"), Op("add_r")), r=r),
            (x, _randn(device, 7), _randn(device, 7), _randn(device, 2, 5, 7, seed=1)),
        ),
        "fused_norm (group)": (
            lambda x, v: fused_norm(x, "group", None, None, 1e-5, 2, epilogue=(Op("mul_v"),), v=v),
            (_randn(device, 2, 4, 3, 3), _randn(device, 4)),
        ),
        "pointwise_chain": (
            lambda x, v: pointwise_chain(x, (Op("add_v"), Op("tanh"), Op("clamp_min", -0.5)), v, 1),
            (x, _randn(device, 5)),
        ),
        "fused_reduce": (lambda x: fused_reduce(x, "max", 1, True, (Op("abs"), Op("mul", -1.0))), (x,)),
        "fused_softmax": (lambda x: fused_softmax(x, "log_softmax", 0.5), (x,)),
        "fused_softmax (logsumexp)": (lambda x: fused_softmax(x, "logsumexp"), (x,)),
        "split_tf32": (lambda x: torch.stack(split_tf32(x * 3.0)), (x,)),
    }


def _hetforge_ops(counter: CompileCounterWithBackend) -> list[str]:
    return [str(n.target) for gm in counter.graphs for n in gm.graph.nodes if str(n.target).startswith("hetforge.")]


@pytest.mark.parametrize("name", list(entry_points("cpu")))
def test_compiled_entry_point_matches_eager(device, name):
    fn, args = entry_points(device)[name]
    expected = fn(*args)
    counter = CompileCounterWithBackend("inductor")
    got = torch.compile(fn, backend=counter, fullgraph=True)(*args)  # fullgraph: a graph break raises
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    op = f"hetforge.{name.split(' ')[0]}.default"
    assert _hetforge_ops(counter) == ([op] if _kernels_run(device) else [])


def op_samples(device):
    """(op, arguments) for each custom op, as its schema takes them."""
    x = _randn(device, 2, 5, 7)
    ops = torch.ops.hetforge
    ep = encode(CHAIN)
    return [
        (ops.gemm_epilogue.default, (x, _randn(device, 7, 9), _randn(device, 9), ep, _randn(device, 9), _randn(device, 2, 5, 9), "strict", None)),
        (ops.gemm_epilogue.default, (x, _randn(device, 7, 9), None, "", None, None, "tf32", _randn(device, 7, 9))),
        (ops.bmm_epilogue.default, (_randn(device, 3, 5, 7), _randn(device, 3, 7, 9), ep, _randn(device, 9), _randn(device, 3, 5, 9), "strict")),
        (ops.fused_norm.default, (x, "rms", _randn(device, 7), None, 1e-6, 1, 1, encode((Op("relu"),)), None, None)),
        (ops.fused_norm.default, (x, "layer", None, None, 1e-5, 1, 2, "", None, x)),
        (ops.pointwise_chain.default, (x, encode((Op("mul_v"), Op("add_r"))), _randn(device, 5), 1, x)),
        (ops.fused_reduce.default, (x, "mean", -1, False, encode((Op("exp"),)), None, 1)),
        (ops.fused_softmax.default, (x, "softmax", 2.0)),
        (ops.fused_softmax.default, (x, "logsumexp", 1.0)),
        (ops.split_tf32.default, (x,)),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(len(op_samples("cpu"))))
def test_opcheck(device, index):
    """Schema, fake implementation (shapes, dtypes, strides), no aliasing or mutation, dynamic shapes."""
    op, args = op_samples(device)[index]
    torch.library.opcheck(op, args)


class Attention(nn.Module):
    """A small attention block of library modules: norm, GEMMs with epilogues, batched products, softmax,
    a pointwise chain and a reduction."""

    def __init__(self, hidden=16, heads=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads, d = heads, hidden // heads
        self.norm = FusedNorm("layer", torch.ones(hidden), torch.zeros(hidden))
        self.qkv = FusedLinear(torch.randn(3 * hidden, hidden, generator=g) / 4, torch.randn(3 * hidden, generator=g))
        self.scores = FusedBmm((Op("mul", 1 / math.sqrt(d)),))
        self.softmax = FusedSoftmax()
        self.context = FusedBmm()
        self.out = FusedLinear(torch.randn(hidden, hidden, generator=g) / 4, None, (Op("gelu"), Op("add_r")))
        self.chain = PointwiseChain((Op("mul", 2.0), Op("tanh")))
        self.pool = FusedReduce("mean", 1, False)

    def forward(self, x):  # x: [B, S, H]
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm(x)).split(h, dim=-1)

        def heads(t):  # [B, S, H] -> [B * heads, S, H / heads]
            return t.reshape(b, s, self.heads, -1).transpose(1, 2).reshape(b * self.heads, s, -1)

        p = self.softmax(self.scores(heads(q), heads(k).transpose(1, 2)))
        ctx = self.context(p, heads(v)).reshape(b, self.heads, s, -1).transpose(1, 2).reshape(b, s, h)
        return self.pool(self.chain(self.out(ctx, residual=x)))


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_library_module_compiles_whole(device, grad_mode):
    """As the verifier and the server run a composed variant: eval mode, no autograd, one graph."""
    model = Attention().to(device).eval()
    x = _randn(device, 2, 6, 16)
    counter = CompileCounterWithBackend("inductor")
    with grad_mode():
        expected = model(x)
        got = torch.compile(model, backend=counter, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    # norm, qkv, 2 bmm, softmax, out, chain, pool: each one op when the kernels run
    assert len(_hetforge_ops(counter)) == (8 if _kernels_run(device) else 0)


def test_epilogue_encoding_round_trips():
    every_op = tuple(Op(name, 0.1 if name in TAKES_SCALAR else 0.0) for name in CODES)
    for ep in [(), every_op, (Op("mul", 1 / 3), Op("clamp_min", -1e-300), Op("add", 5e-324), Op("rsub", math.inf))]:
        assert decode(encode(ep)) == ep
    assert decode(encode(every_op)) is decode(encode(every_op))  # parsed once per string
    with pytest.raises(ValueError, match='Got "relu" for an encoded epilogue op'):
        decode("relu")
    with pytest.raises(ValueError, match='Got "nope" for an epilogue op'):
        decode("nope:0.0")


def test_direct_only_for_plain_tensors_in_eager():
    x = torch.zeros(2)
    assert custom_ops.direct(x)
    assert not custom_ops.direct(nn.Parameter(x))
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def f(t):
        seen.append(custom_ops.direct(t))
        return t + 1

    f(x)
    assert seen == [False]


def test_registration_survives_a_second_execution_and_a_fork():
    """Each kernel module executed twice (importlib.reload) keeps its op; a forked worker calls the ops."""
    script = r"""
import importlib, multiprocessing, os, sys
import torch
from hetforge.kernels.triton import gemm_epilogue, norm, pointwise, reduce, softmax
from hetforge.kernels.triton.epilogue import Op
before = torch.ops.hetforge.gemm_epilogue.default
for m in (gemm_epilogue, norm, pointwise, reduce, softmax):
    importlib.reload(m)
assert torch.ops.hetforge.gemm_epilogue.default is before
x, w = torch.randn(3, 4), torch.randn(4, 5)
expected = torch.relu(x @ w)

def child(q):
    importlib.reload(gemm_epilogue)
    q.put(torch.equal(torch.ops.hetforge.gemm_epilogue.default(x, w, None, "relu:0.0", None, None, "strict", None), expected)
          and torch.equal(gemm_epilogue.gemm_epilogue(x, w, None, (Op("relu"),)), expected))

ctx = multiprocessing.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start(); p.join(120)
print("child ok" if p.exitcode == 0 and q.get(timeout=5) else "child FAILED")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("child ok"), out.stdout + out.stderr[-2000:]
