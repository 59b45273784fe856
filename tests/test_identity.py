"""The extraction fingerprint keys the ledger: when it changes, every note of every output is extracted again. These
pin it for the shipped configuration (conf/local.yaml, with its adapter and with the base model alone) on both
shipped tasks, so that it changes only on purpose."""

from __future__ import annotations

import pytest

from notelake.conf import load_settings
from notelake.conf.task import load_task
from notelake.jobs.extraction.identity import describe_extraction

# Change one only with what changes answers (a new adapter, prompt, parser, sampling setting, window recovery or
# assertion method), and say in the upgrade notes that every note is extracted again.
PINNED = {
    ("phee", "shipped adapter"): "fedca345175ccfcc259c76d372fc7347",
    ("phee", "base model"): "e1a12a1ba2761dfa1d87676c8842bf8b",
    ("maccrobat", "shipped adapter"): "f739580638454fa6d68de4132e681ec4",
    ("maccrobat", "base model"): "6ce4d72f6c012ae5145230b17fb8eebf",
}


@pytest.mark.parametrize(("task", "engine"), list(PINNED))
def test_fingerprint_of_the_shipped_configuration_is_pinned(base_model_path, task, engine):
    settings = load_settings()
    if engine == "base model":  # --adapter none
        settings = settings.with_overrides(engine={"adapter": None})
    identity = describe_extraction(settings, load_task(task))
    assert identity.fingerprint == PINNED[(task, engine)]
    assert identity.lineage("r1").fingerprint == identity.fingerprint
