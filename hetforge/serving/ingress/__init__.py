"""The HTTP surface of a served pipeline: a FastAPI app of routers per concern (`create_app`)."""

from hetforge.serving.ingress.app import create_app

__all__ = ["create_app"]
