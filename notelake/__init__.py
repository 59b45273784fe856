"""notelake: clinical notes -> structured, queryable facts (Spark -> Ray/vLLM -> Delta)."""

__version__ = "0.5.0"
