import torch

from hetforge.kernels.triton.gemm_epilogue import gemm_epilogue

torch.backends.cuda.matmul.allow_tf32 = False
for m, k, n in ((4096, 4096, 4096), (256, 4096, 4096)):
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda")
    truth = x.double() @ w.double().t()
    ref = (x @ w.t()).double()
    got = gemm_epilogue(x, w.t().contiguous(), None, ()).double()
    for name, v in (("cublas fp32", ref), ("hetforge tf32x3", got)):
        d = (v - truth).abs()
        print(
            m, k, n, name, f"max abs vs fp64 {d.max().item():.2e}", f"norm rel {(d.norm() / truth.norm()).item():.2e}"
        )
    d = (got - ref).abs()
    bad = (d > 1e-4 + 1e-4 * ref.abs()).sum().item()
    print(f"  vs cublas: max abs {d.max().item():.2e}, elements outside strict {bad}")
