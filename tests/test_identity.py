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
    ("phee", "shipped adapter"): "17044254a211d4a4f2f358c56bdb867f",
    ("phee", "base model"): "4b39abb4c0b4db768ab282c43916ad87",
    ("maccrobat", "shipped adapter"): "7a3f8e2e0a94587852dedeb2bd7561f0",
    ("maccrobat", "base model"): "4c12551a0e5b0d70967eab75134bfd32",
}


@pytest.mark.parametrize(("task", "engine"), list(PINNED))
def test_fingerprint_of_the_shipped_configuration_is_pinned(base_model_path, task, engine):
    settings = load_settings()
    if engine == "base model":  # --adapter none
        settings = settings.with_overrides(engine={"adapter": None})
    identity = describe_extraction(settings, load_task(task))
    assert identity.fingerprint == PINNED[(task, engine)]
    assert identity.lineage("r1").fingerprint == identity.fingerprint
