"""Engines, Ray actors, adapters, training and evaluation. Heavy imports (torch, vllm, ray) are lazy."""
