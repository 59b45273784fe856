"""Adapter manifests: verified before serving; tampered or wrong-base adapters refused; unknown task warns."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from notelake.models.adapters import AdapterError, AdapterInfo, ZeroShotWarning, load_adapter, write_adapter_manifest
from notelake.models.base_model import MANIFEST, combined_sha256


def test_verify_ok(tiny_adapter, base_model_sha, recwarn):
    info = load_adapter(tiny_adapter, base_model_sha, "phee")
    assert isinstance(info, AdapterInfo)
    assert info.name == "tiny-test" and info.tasks == ["phee"] and info.rank == 8
    assert info.base_model_sha256 == base_model_sha
    manifest = json.loads((tiny_adapter / MANIFEST).read_text())
    assert info.sha256 == manifest["sha256"] == combined_sha256(manifest["files"])
    assert "adapter_model.safetensors" in manifest["files"] and manifest["weights_sha256"]
    assert sorted(info.target_modules) == ["q_proj", "v_proj"]
    assert not [w for w in recwarn if issubclass(w.category, ZeroShotWarning)]


def test_tampered_adapter_refused(tiny_adapter, base_model_sha, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(tiny_adapter, copy)
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_adapter(copy, base_model_sha)


def test_edited_manifest_refused(tiny_adapter, base_model_sha, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(tiny_adapter, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["adapter_config.json"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match="manifest"):
        load_adapter(copy, base_model_sha)


def test_missing_manifest_refused(tiny_adapter, base_model_sha, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(tiny_adapter, copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(AdapterError, match="manifest"):
        load_adapter(copy, base_model_sha)


def test_wrong_base_refused(tiny_adapter, base_model_sha):
    other = "f" * 64
    with pytest.raises(AdapterError) as err:
        load_adapter(tiny_adapter, other)
    assert base_model_sha in str(err.value) and other in str(err.value)


def test_unknown_task_warns_and_runs_zero_shot(tiny_adapter, base_model_sha, caplog):
    with caplog.at_level(logging.WARNING, logger="notelake.models.adapters"):
        with pytest.warns(ZeroShotWarning, match="not trained on task maccrobat"):
            info = load_adapter(tiny_adapter, base_model_sha, "maccrobat")
    assert info.tasks == ["phee"]
    assert "adapter tiny-test was not trained on task maccrobat: running zero-shot" in caplog.text


def test_write_manifest_recomputes(tiny_adapter, tmp_path, base_model_sha):
    copy = tmp_path / "a"
    shutil.copytree(tiny_adapter, copy)
    old = json.loads((copy / MANIFEST).read_text())
    fields = {k: v for k, v in old.items() if k not in ("files", "sha256")}
    fields["dev_scores"] = {"phee": {"f1": 0.5}}
    new = write_adapter_manifest(copy, **fields)
    assert new["sha256"] == old["sha256"]  # same files -> same hash
    assert new["dev_scores"] == {"phee": {"f1": 0.5}}
    assert load_adapter(copy, base_model_sha).manifest["dev_scores"] == {"phee": {"f1": 0.5}}


def test_merged_model_folds_the_lora_into_the_weights_and_rebuilds_when_tampered(tiny_adapter, base_model_path,
                                                                                 base_model_sha, tmp_path):
    import torch
    from safetensors.torch import load_file

    from notelake.models.adapters import merged_model

    info = load_adapter(tiny_adapter, base_model_sha)
    merged = merged_model(base_model_path, info, cache_root=tmp_path)
    manifest = json.loads((merged / MANIFEST).read_text())
    assert manifest["merged_from"] == {"base_model_sha256": base_model_sha, "adapter": "tiny-test",
                                       "adapter_sha256": info.sha256}
    # W' = W + (alpha / r) * B @ A for an adapted projection; an untouched one is unchanged.
    lora = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    key = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in lora.items() if k.endswith(f"{key}.lora_A.weight"))
    b = next(v for k, v in lora.items() if k.endswith(f"{key}.lora_B.weight"))
    base, out = load_file(str(base_model_path / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    expected = base[f"{key}.weight"].float() + cfg["lora_alpha"] / cfg["r"] * (b.float() @ a.float())
    torch.testing.assert_close(out[f"{key}.weight"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"].float())

    built = (merged / "model.safetensors").stat().st_mtime_ns
    assert merged_model(base_model_path, info, cache_root=tmp_path) == merged  # cached: not rebuilt
    assert (merged / "model.safetensors").stat().st_mtime_ns == built
    (merged / "config.json").write_text("{}")  # tampered: verified on reuse and rebuilt
    assert merged_model(base_model_path, info, cache_root=tmp_path) == merged
    assert json.loads((merged / "config.json").read_text()) != {}
