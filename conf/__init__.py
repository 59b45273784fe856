"""Typed configuration (pydantic) and per-environment YAML files. Imports no torch, vllm or ray."""

from notelake.conf.settings import (
    CONF_DIR,
    TASKS_DIR,
    ConfigError,
    EngineConfig,
    InputConfig,
    JobConfig,
    RayConfig,
    Settings,
    SparkConfig,
    load_settings,
    notelake_home,
)

__all__ = [
    "CONF_DIR", "TASKS_DIR", "ConfigError", "EngineConfig", "InputConfig", "JobConfig", "RayConfig",
    "Settings", "SparkConfig", "load_settings", "notelake_home",
]
