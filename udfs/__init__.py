"""Pure functions of extraction: prompts, answer schema, parsing, grounding, chunking, table schemas.

Imports no torch, vllm or ray, so it runs inside Spark executors, Ray actors and training alike.
"""
