"""Hand-written Triton kernels, each with its torch reference (`*_reference`) and a CPU path.

  gemm_epilogue   x @ W^T + b, then a fused pointwise chain (scale, activations, clamp, residual)
  norm            layer / RMS / group normalization fused with the following pointwise chain
  softmax         softmax, log-softmax and log-sum-exp over the last dim, with a fused input scale
  pointwise       a long pointwise chain in one pass (one read, one write)
  reduce          sum / mean / max / min over one dim, with a fused pointwise prologue

Kernels run on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (the tests). Elsewhere
the wrappers fall back to their torch path, so a fused module works on every device.
"""
