#!/usr/bin/env bash
# The GPU bench in one go (after install_offline.sh): rows 1 (bare vLLM, job engine args and vLLM defaults),
# 2 (the job; without Spark when pyspark or Java is absent: Ray actors + engine + parse + Delta),
# 4 (base vs LoRA, guided JSON on/off) and several adapters mixed in one batch, with conf/gpu.yaml.
#
#   bash bench/gpu/run_gpu.sh [notes, default 1024] [max_tokens, default 256]
# Results: runs/bench/gpu-<UTC time>/results.json, results.md, throughput.svg (copy them out of the box).
set -euo pipefail
cd "$(dirname "$0")/../.."
NOTES=${1:-1024}
MAX_TOKENS=${2:-256}
PY=${PYTHON:-python3}
if "$PY" -c "import pyspark" 2>/dev/null && command -v java >/dev/null; then JOB_ROW=job; else JOB_ROW=job-nospark; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m bench.run --conf conf/gpu.yaml --notes "$NOTES" --max-tokens "$MAX_TOKENS" --scaling "" \
    --rows "bare,bare-default,$JOB_ROW,lora,multi-adapter" --out "runs/bench/gpu-$(date -u +%Y%m%dT%H%M%S)"
