"""Serving pipelines on Ray Serve: stage runtimes, metrics, hot-swap (needs the `serving` extra)."""
