"""Device classes and the autotune configurations each kernel tries on them.

Hopper (H100/H200) gets larger tiles and deeper pipelines (228 KB of shared memory per SM, TMA-fed
wgmma); Ampere-class parts get the configurations from Triton's matmul tutorial; the interpreter
(`TRITON_INTERPRET=1`, CPU tests) gets one small configuration so tests stay quick.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from hetforge import config


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(x: torch.Tensor) -> bool:
    """Whether a kernel runs on `x` (CUDA, or CPU under the interpreter when asked): else its torch path."""
    return x.is_cuda or config.kernels_on_cpu()


@functools.cache
def device_class() -> str:
    """interpreter | hopper | blackwell | ampere | generic."""
    if interpreted() or not torch.cuda.is_available():
        return "interpreter"
    major, _ = torch.cuda.get_device_capability()
    return {9: "hopper", 10: "blackwell", 12: "blackwell", 8: "ampere"}.get(major, "generic")


def gemm_configs() -> list[triton.Config]:
    cls = device_class()
    if cls == "interpreter":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 3),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 4, 4),
    ]
    if cls in ("hopper", "blackwell"):
        shapes += [
            (128, 256, 64, 8, 4),
            (256, 128, 32, 8, 3),
            (64, 256, 32, 4, 4),
            (128, 256, 32, 8, 4),
            (128, 128, 64, 4, 3),
        ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


@functools.cache
def shared_memory_bytes() -> int:
    """Shared memory one program may use on this device (what autotune configurations must fit in)."""
    if device_class() == "interpreter":
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024)


def row_configs() -> list[triton.Config]:
    """Row kernels (norms, softmax): the block covers a row; warps scale with it."""
    if device_class() == "interpreter":
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]


def flat_configs() -> list[triton.Config]:
    """Element-wise and strided-reduction kernels: block size and warps."""
    if device_class() == "interpreter":
        return [triton.Config({"BLOCK": 256}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8))]
