"""Shared fixtures. Heavy ones (base model, Ray, the vLLM engine actor) are SESSION-scoped and created lazily:

* ``base_model_path`` -- the fetched, checksummed base model folder (fetch_base(); ~20 s the first time).
* ``settings``        -- the Settings used by the engine tests (conf/local.yaml, engine max_model_len 2048,
                         max_num_seqs 8, grounded guided decoding, no default adapter).
* ``ray_address``     -- one local Ray (num_cpus=2) for the whole session; returns its GCS address.
* ``engine_pool``     -- one EnginePool (one vLLM engine actor, LoRA not enabled: the engine the job starts for
                         the base model) shared by every test that needs vLLM.
* ``lora_pool``       -- the same engine with LoRA enabled, for per-request adapters (module-scoped).
* ``tiny_adapter``    -- a tiny LoRA adapter (PEFT, r=8, random init) with its manifest, in a tmp folder.
* ``replay``          -- the job's settings (task phee, any error rate) on the REPLAY engine, whose actor lives for
                         the module that uses it (data-plane tests: made-up answers grounded in the text).
* ``spark``           -- one local Spark session (driver maxResultSize 1m: note text must never reach the driver).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep Ray quiet and local: no usage stats, no dashboard, small object store.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    from notelake.models.base_model import fetch_base

    return fetch_base()


@pytest.fixture(scope="session")
def base_model_sha(base_model_path) -> str:
    from notelake.models.base_model import model_sha256

    return model_sha256(base_model_path)


@pytest.fixture(scope="session")
def settings():
    from notelake.conf import load_settings

    return load_settings().with_overrides(
        engine={"max_model_len": 2048, "max_num_seqs": 8, "guided_decoding": "grounded", "adapter": None,
                "enable_lora": False, "max_lora_rank": 16, "gpu_memory_utilization": 0.15},
        ray={"num_cpus": 2, "num_actors": 1, "num_cpus_per_actor": 1},
    )


@pytest.fixture(scope="session")
def ray_address(settings):
    import ray

    from notelake.models.actor import ensure_ray

    address = ensure_ray(settings.ray)
    yield address
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def engine_pool(ray_address, settings, base_model_path):
    from notelake.models.actor import EnginePool

    pool = EnginePool.get_or_create(settings)
    pool.ready()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def lora_pool(ray_address, settings, base_model_path):
    from notelake.models.actor import EnginePool

    # half a CPU: it lives beside engine_pool, and a test may start a third actor (Ray has 2 CPUs)
    pool = EnginePool.get_or_create(settings.with_overrides(engine={"enable_lora": True},
                                                            ray={"num_cpus_per_actor": 0.5}))
    pool.ready()
    yield pool
    pool.shutdown()


def make_tiny_adapter(base_model_path: Path, out: Path, *, name: str = "tiny-test", tasks=("phee",), r: int = 8,
                      base_model_sha: str | None = None, seed: int = 0) -> Path:
    """A randomly initialised LoRA adapter (so it visibly changes the output) with a manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from notelake.models.adapters import write_adapter_manifest
    from notelake.models.base_model import model_sha256

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=4 * r, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    write_adapter_manifest(
        out, name=name, base_model="smollm2-135m-instruct",
        base_model_sha256=base_model_sha or model_sha256(base_model_path),
        tasks=list(tasks), label_sets={}, prompt_versions={}, training={"kind": "random-init test adapter"},
        data_fingerprint=None, dev_scores={},
    )
    return out


@pytest.fixture(scope="session")
def tiny_adapter(base_model_path, tmp_path_factory) -> Path:
    return make_tiny_adapter(base_model_path, tmp_path_factory.mktemp("adapters") / "tiny")


@pytest.fixture(scope="module")
def replay(request, settings, ray_address, base_model_path):
    from jobkit import job_settings

    from notelake.models.actor import EnginePool

    # a namespace per module: a module's actors never meet another module's (shut down or dying) ones by name
    cfg = job_settings(settings).with_overrides(engine={"backend": "replay", "max_model_len": 1024},
                                                ray={"namespace": f"notelake-{request.module.__name__}"})
    pool = EnginePool.get_or_create(cfg)
    pool.ready()
    yield cfg
    pool.shutdown()


@pytest.fixture(scope="session")
def spark(settings):
    from notelake.jobs.extraction.session import start_spark

    # local[2,2]: a failed task is retried once, as on a cluster (tests/test_nightly.py loses a task attempt)
    session = start_spark(settings.with_overrides(
        spark={"master": "local[2,2]", "extra": {"spark.driver.maxResultSize": "1m", "spark.ui.enabled": "false"}}))
    yield session
    session.stop()
