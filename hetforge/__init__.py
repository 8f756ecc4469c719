"""hetforge: plan, optimize and serve agentic AI pipelines on heterogeneous hardware.

Subpackages, in dependency order:
  spec       the pipeline YAML format (pydantic) and its located-error loader
  planners   the pipeline graph, devices, profiles, placement
  optimizer  verification and kernel-generation agents (torch, triton, numpy only)
  kernels    hand-written Triton kernels and the registry of verified variants
  serving    Ray Serve deployment, metrics, hot-swap
"""

__version__ = "0.1.0"
