"""The library's entry points as PyTorch custom operators, `torch.ops.hetforge.<name>`, for torch.compile.

Dynamo cannot trace the library's Triton launches: on torch 2.11 (H200) every composition of the
library with torch.compile failed on its first call inside Dynamo's handling of the GEMM kernel's
`@triton.autotune(..., prune_configs_by=...)` ("ListVariable ... is already tracked for mutation").
Each entry point is therefore one opaque custom op (`torch.library.custom_op`) with a fake
implementation that gives its output's shape, dtype and device: Dynamo puts the op in the graph
without a break, Inductor calls it as an extern kernel, and the kernel launches exactly as in eager,
with Triton's own autotuner and cache.

Why `custom_op` and not `triton_op` + `wrap_triton`: `triton_op` makes Inductor trace the launcher
and compile the user kernels itself, through the same user-Triton machinery (autotune configs,
`prune_configs_by`) that failed above; the launchers also do host-side work that tracing must
follow (`split_tf32`'s own launch, constexpr dicts, grid lambdas, the torch fallback off CUDA). An
opaque op gives up fusion across its boundary, which costs little here: each op is already a fused
kernel, and Inductor still fuses the eager ops around it.

Arguments a schema cannot carry are encoded: an epilogue as a canonical string
(`epilogue.encode`, decoded once per distinct string). Outputs are fresh tensors (no aliasing, no
mutation: `mutates_args=()`). No autograd formula: library modules are inference-only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "hetforge"


def define(name: str, schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """`impl` registered as `torch.ops.hetforge.<name>` (schema as in native_functions.yaml), with its fake.

    Once per process: a module executed a second time (importlib.reload, the same file imported under
    another name) finds the op defined and gets it back; redefining a name raises on some torch versions.
    """
    if not hasattr(getattr(torch.ops, NAMESPACE), name):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def direct(x: torch.Tensor) -> bool:
    """Whether a call may run its launcher directly instead of through the op: a plain tensor outside
    torch.compile and export tracing (those see fake or functional tensor subclasses, or run under Dynamo).

    Custom-op dispatch adds 16-24 us a call on an H200's host (torch 2.11: 35 -> 51 us for a small
    fused_softmax, bench/kernels/probe_op_overhead.py); eager calls skip it, so eager timings are the
    launchers' own.
    """
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()
