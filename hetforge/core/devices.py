"""Device facts and device classes: the vocabulary the planner, the optimizer and serving share.

A *device class* names a kind of device that a variant is verified on and a stage is placed on:
`cpu`, or a GPU model such as `H100` (from the CUDA device name, `gpu_class`). A variant verified on
one class is served only on that class. `device_name` is the name verdicts and benchmark headers
record. Torch and the standard library only.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DeviceFacts:
    """Peak rates (dense, no sparsity), memory bandwidth and sizes of one device model."""

    name: str
    fp32_tflops: float
    tf32_tflops: float  # fp32 rate where the device has no TF32
    bf16_tflops: float  # fp32 rate where the device has no bf16 tensor cores
    bandwidth_gbs: float  # memory bandwidth, GB/s
    memory_gib: float
    l2_mib: float
    # Per-op cost of eager PyTorch on a GPU (dispatch + launch): measured on an H100, the 64-op embed
    # stage of examples/retrieval_agent.yaml took 1.10 ms where its FLOPs and bytes need 0.02 ms.
    launch_us: float = 15.0

    def peak_tflops(self, precision: str) -> float:
        return {"strict": self.fp32_tflops, "tf32": self.tf32_tflops, "bf16": self.bf16_tflops}[precision]


GPU_FACTS: dict[str, DeviceFacts] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TF, TF32 494 TF / BF16 989 TF dense
    # (the datasheet's 989 / 1979 are with sparsity), HBM3 3.35 TB/s, 80 GB; L2 50 MB (Hopper whitepaper).
    "H100": DeviceFacts("H100", 67.0, 494.0, 989.0, 3350.0, 80.0, 50.0),
    # NVIDIA H200 datasheet (SXM): the H100's compute, HBM3e 4.8 TB/s, 141 GB; L2 50 MB.
    "H200": DeviceFacts("H200", 67.0, 494.0, 989.0, 4800.0, 141.0, 50.0),
    # NVIDIA DGX B200 datasheet, per GPU (approximate: the datasheet gives system totals and sparse
    # rates): TF32 1.1 PF, BF16 2.25 PF dense, HBM3e 8 TB/s, 180 GB; FP32 ~80 TF; L2 126 MB.
    "B200": DeviceFacts("B200", 80.0, 1100.0, 2250.0, 8000.0, 180.0, 126.0),
    # NVIDIA A100 datasheet (SXM 80GB): FP32 19.5 TF, TF32 156 TF, BF16 312 TF dense, 2039 GB/s; L2 40 MB.
    "A100": DeviceFacts("A100", 19.5, 156.0, 312.0, 2039.0, 80.0, 40.0),
    # NVIDIA A10 datasheet (A10G in AWS G5 is the same GA102 part): FP32 31.2 TF, TF32 62.5 TF,
    # BF16 125 TF dense, 600 GB/s, 24 GB; L2 6 MB (GA102).
    "A10G": DeviceFacts("A10G", 31.2, 62.5, 125.0, 600.0, 24.0, 6.0),
    # NVIDIA L4 datasheet: FP32 30.3 TF, TF32 60 TF, BF16 121 TF dense, 300 GB/s, 24 GB; L2 48 MB (AD104).
    "L4": DeviceFacts("L4", 30.3, 60.0, 121.0, 300.0, 24.0, 48.0),
    # NVIDIA L40S datasheet: FP32 91.6 TF, TF32 183 TF, BF16 362 TF dense, 864 GB/s, 48 GB; L2 96 MB.
    "L40S": DeviceFacts("L40S", 91.6, 183.0, 362.0, 864.0, 48.0, 96.0),
    # NVIDIA T4 datasheet: FP32 8.1 TF, no TF32 or BF16 (FP16 65 TF, not used here), 320 GB/s, 16 GB; L2 4 MB.
    "T4": DeviceFacts("T4", 8.1, 8.1, 8.1, 320.0, 16.0, 4.0),
    # NVIDIA V100 datasheet (SXM2 32GB): FP32 15.7 TF, no TF32 or BF16, 900 GB/s; L2 6 MB.
    "V100": DeviceFacts("V100", 15.7, 15.7, 15.7, 900.0, 32.0, 6.0),
    # NVIDIA RTX PRO 6000 Blackwell datasheet (approximate): FP32 ~125 TF, BF16 ~500 TF dense,
    # GDDR7 1792 GB/s, 96 GB; L2 128 MB.
    "RTX6000-BLACKWELL": DeviceFacts("RTX6000-BLACKWELL", 125.0, 250.0, 500.0, 1792.0, 96.0, 128.0),
}


def gpu_class(device_name: str) -> str:
    """The table's class for a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100")."""
    upper = device_name.upper().replace(" ", "")
    if "RTXPRO6000" in upper or ("6000" in upper and "BLACKWELL" in upper):
        return "RTX6000-BLACKWELL"
    for name in sorted(GPU_FACTS, key=len, reverse=True):
        if name in upper:
            return name
    return "cuda"


def local_device_class(device: str) -> str:
    """The device class of this process's `device` ("cuda" -> the GPU model of device 0, else "cpu")."""
    if device == "cuda":
        return gpu_class(torch.cuda.get_device_name(0))
    return "cpu"


def device_name(device: str) -> str:
    """The device's name as verdicts and benchmark headers record it."""
    if device == "cuda":
        try:
            return torch.cuda.get_device_name(0)
        except (RuntimeError, AssertionError) as err:
            return f"cuda (unavailable: {err})"
    # The family and model too: a VM's "AMD EPYC" hides the generation, and the library's oneDNN GEMMs ran
    # 2.0-2.2x over eager on one host and 1.06-2.12x on a Zen 4 (family 25) one (bench/kernels/results_cpu_onednn*).
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
            if ":" in line
        )
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "model name" in fields:
            return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    except OSError:
        pass
    return platform.processor() or "cpu"
