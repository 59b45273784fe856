"""The extraction fingerprint keys the ledger: when it changes, every note of every output is extracted again. These
pin it for the shipped configuration (conf/local.yaml, with its adapter and with the base model alone) on both
shipped tasks, so that it changes only on purpose."""

from __future__ import annotations

import pytest

from notelake.conf import load_settings
from notelake.conf.task import load_task
from notelake.jobs.extraction.identity import describe_extraction

# Change one only with what changes answers (a new adapter, prompt, parser or sampling setting), and say in the
# upgrade notes that every note is extracted again.
PINNED = {
    ("phee", "shipped adapter"): "609ecaa199867208e3ed747fb9a309e0",
    ("phee", "base model"): "9caee4eb28e751d691b8897246aec659",
    ("maccrobat", "shipped adapter"): "8eff7e74c0283ca3f09cfe9452e16f5c",
    ("maccrobat", "base model"): "cca8c3450684aba9654391fbdc9b8939",
}


@pytest.mark.parametrize(("task", "engine"), list(PINNED))
def test_fingerprint_of_the_shipped_configuration_is_pinned(base_model_path, task, engine):
    settings = load_settings()
    if engine == "base model":  # --adapter none
        settings = settings.with_overrides(engine={"adapter": None})
    identity = describe_extraction(settings, load_task(task))
    assert identity.fingerprint == PINNED[(task, engine)]
    assert identity.lineage("r1").fingerprint == identity.fingerprint
