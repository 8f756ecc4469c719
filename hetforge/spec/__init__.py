"""The pipeline spec: YAML -> validated pydantic models, with located errors.

Needs the `spec` extra (pydantic, pyyaml, networkx).
"""

from hetforge.spec.errors import Diagnostic, SpecError
from hetforge.spec.load import SpecIOError, load_bytes, load_pipeline
from hetforge.spec.models import LlmStage, ModelStage, Pipeline, ToolStage

__all__ = [
    "Diagnostic",
    "LlmStage",
    "ModelStage",
    "Pipeline",
    "SpecError",
    "SpecIOError",
    "ToolStage",
    "load_bytes",
    "load_pipeline",
]
