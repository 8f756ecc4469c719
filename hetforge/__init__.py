"""hetforge: plan, optimize and serve agentic AI pipelines on heterogeneous hardware.

Subpackages, bottom to top (each imports only those below it; tests/test_layering.py checks it):
  core       the shared vocabulary: problems and fingerprints, device classes, precision policies
  kernels    hand-written Triton kernels, fused modules and the registry of verified variants
  optimizer  verification and kernel-generation agents (torch, triton, numpy only)
  spec       the pipeline YAML format (pydantic), its located-error loader, the pipeline graph
  planners   devices, profiles, placement
  serving    Ray Serve deployment, metrics, hot-swap, background re-optimization
  cli, demo  the command line
"""

__version__ = "0.1.0"
