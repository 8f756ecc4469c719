"""GEMM + epilogue kernel against its float64 torch reference: odd sizes, every op, dtypes."""

import pytest
import torch

from hetforge.kernels.triton.epilogue import CODES, TAKES_RESIDUAL, TAKES_SCALAR, TAKES_VECTOR, Op, torch_apply
from hetforge.kernels.triton.gemm_epilogue import bmm_epilogue, gemm_epilogue, split_tf32

# (atol, rtol) per input dtype: the kernel accumulates in fp32 whatever the inputs
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}


def _reference(x, w, b, ep, v, r):
    out = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    return torch_apply(out, ep, v.double() if v is not None else None, r.double() if r is not None else None)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 5), (127, 33, 65), (64, 70, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_and_dtypes(triton_on_cpu, m, k, n, dtype):
    torch.manual_seed(m * 1000 + n)
    dev = triton_on_cpu
    x, w = torch.randn(m, k, device=dev).to(dtype), torch.randn(n, k, device=dev).to(dtype)
    b = torch.randn(n, device=dev).to(dtype)
    ep = (Op("mul", 0.5), Op("relu"), Op("add", 0.1))
    out = gemm_epilogue(x, w.t().contiguous(), b, ep)
    assert out.dtype == dtype and out.shape == (m, n)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), _reference(x, w, b, ep, None, None), atol=atol * max(1, k**0.5), rtol=rtol)


@pytest.mark.parametrize("name", sorted(CODES))
def test_every_op(triton_on_cpu, name):
    torch.manual_seed(len(name))
    dev = triton_on_cpu
    x, w, b = torch.randn(9, 20, device=dev), torch.randn(17, 20, device=dev), torch.randn(17, device=dev)
    v, r = torch.randn(17, device=dev), torch.randn(9, 17, device=dev)
    op = Op(name, 0.3 if name in TAKES_SCALAR else 0.0)
    out = gemm_epilogue(
        x, w.t().contiguous(), b, (op,), v if name in TAKES_VECTOR else None, r if name in TAKES_RESIDUAL else None
    )
    expected = _reference(x, w, b, (op,), v if name in TAKES_VECTOR else None, r if name in TAKES_RESIDUAL else None)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_batched_input_no_bias_and_long_chain(triton_on_cpu):
    torch.manual_seed(3)
    dev = triton_on_cpu
    x, w = torch.randn(2, 3, 31, device=dev), torch.randn(40, 31, device=dev)
    r, v = torch.randn(2, 3, 40, device=dev), torch.randn(40, device=dev)
    ep = (
        Op("add_v"),
        Op("gelu"),
        Op("add_r"),
        Op("clamp_min", -0.5),
        Op("clamp_max", 0.5),
        Op("silu"),
        Op("mul", 3.0),
        Op("tanh"),
    )
    out = gemm_epilogue(x, w.t().contiguous(), None, ep, v, r)
    torch.testing.assert_close(out.double(), _reference(x, w, None, ep, v, r), atol=1e-4, rtol=1e-4)


def test_missing_operand_is_a_clear_error(triton_on_cpu):
    x, w = torch.randn(4, 8, device=triton_on_cpu), torch.randn(8, 6, device=triton_on_cpu)
    with pytest.raises(ValueError, match="vector or residual"):
        gemm_epilogue(x, w, None, (Op("add_r"),))
    with pytest.raises(ValueError, match="epilogue op"):
        Op("no_such_op")


def test_cpu_tensors_take_the_torch_path_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("HETFORGE_KERNELS_ON_CPU", raising=False)
    x, w, b = torch.randn(5, 8), torch.randn(8, 6), torch.randn(6)
    out = gemm_epilogue(x, w, b, (Op("relu"),))
    torch.testing.assert_close(out, torch.relu(x @ w + b))


def test_split_tf32_parts_are_exact_in_tf32_and_sum_to_x(triton_on_cpu):
    torch.manual_seed(5)
    x = torch.randn(3, 1000, device=triton_on_cpu) * torch.logspace(-20, 20, 1000, device=triton_on_cpu)
    hi, lo = split_tf32(x)
    low_bits = 0x1FFF  # the 13 mantissa bits TF32 drops
    assert (
        int((hi.view(torch.int32) & low_bits).abs().max()) == 0
        and int((lo.view(torch.int32) & low_bits).abs().max()) == 0
    )
    rel = ((hi.double() + lo.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel < 2**-21, rel
    with pytest.raises(ValueError, match="float32"):
        split_tf32(x.half())


def test_strict_fp32_keeps_fp32_accuracy_through_the_split(triton_on_cpu):
    """The split path (each K tile's three products from zero) against float64: fp32-level error."""
    torch.manual_seed(11)
    dev = triton_on_cpu
    x, w = torch.randn(70, 300, device=dev), torch.randn(45, 300, device=dev) / 300**0.5
    hi, lo = split_tf32(w)
    truth = x.double() @ w.double().t()
    for out in (gemm_epilogue(x, w.t()), gemm_epilogue(x, hi.t(), w_lo_t=lo.t())):
        err = ((out.double() - truth).norm() / truth.norm()).item()
        assert err < 1e-6, err
    with pytest.raises(ValueError, match="same layout"):
        gemm_epilogue(x, hi.t(), w_lo_t=lo.t().contiguous())


@pytest.mark.parametrize("b_transposed", [False, True])
def test_bmm_epilogue(triton_on_cpu, b_transposed):
    torch.manual_seed(7)
    dev = triton_on_cpu
    a = torch.randn(3, 33, 40, device=dev)
    b = torch.randn(3, 19, 40, device=dev).transpose(1, 2) if b_transposed else torch.randn(3, 40, 19, device=dev)
    v, r = torch.randn(19, device=dev), torch.randn(3, 33, 19, device=dev)
    ep = (Op("mul", 0.5), Op("add_v"), Op("add_r"), Op("gelu"))
    out = bmm_epilogue(a, b, ep, v, r)
    expected = torch_apply(a.double() @ b.double(), ep, v.double(), r.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="B, M, K"):
        bmm_epilogue(a, b[:2])
