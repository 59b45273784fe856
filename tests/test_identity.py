"""The extraction fingerprint keys the ledger: when it changes, every note of every output is extracted again. These
pin it for the shipped configuration (conf/local.yaml, with its adapter and with the base model alone) on both
shipped tasks, so that it changes only on purpose."""

from __future__ import annotations

import pytest

from notelake.conf import load_settings
from notelake.conf.task import load_task
from notelake.jobs.extraction.identity import describe_extraction

# Change one only with what changes answers (a new adapter, prompt, parser, sampling setting, window recovery or
# assertion method, extractor choice), and say in the upgrade notes that every note is extracted again.
PINNED = {
    ("phee", "shipped adapter"): "6e9b204a10e9f35ab50bfd0e2c9e9bb4",
    ("phee", "base model"): "3fb610a9c488b6aac8c38f4a61062bee",
    ("maccrobat", "shipped adapter"): "5a3c6d7f20864aa200d4794b033732f6",  # tagger concepts (auto)
    ("maccrobat", "base model"): "c2c8a1194cfde2985005d70e1ed2f662",
}


@pytest.mark.parametrize(("task", "engine"), list(PINNED))
def test_fingerprint_of_the_shipped_configuration_is_pinned(base_model_path, task, engine):
    settings = load_settings()
    if engine == "base model":  # --adapter none
        settings = settings.with_overrides(engine={"adapter": None})
    identity = describe_extraction(settings, load_task(task))
    assert identity.fingerprint == PINNED[(task, engine)]
    assert identity.lineage("r1").fingerprint == identity.fingerprint
