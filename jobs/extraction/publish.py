"""After the rounds, in the same pass and under the same output lock: link the pass's concepts to the site's OMOP
vocabulary (:func:`notelake.jobs.linking.link_concepts`) and publish the OMOP tables
(:func:`notelake.jobs.omop.publish_omop`), as ``omop.link`` and ``omop.publish`` say. Each logs its own line of
counts; the runs table's ``omop_json`` keeps both stages' stats.

Both are incremental (only rows without a current link, only note buckets whose sources changed), so a night with
nothing new costs a few Delta log reads, and a stage that failed is completed by the next run. A failure here
never undoes the extraction, which is committed by then: the pass logs one line saying so and exits with the
failure's code (:func:`notelake.jobs.cli_common.failure_exit`: 2 configuration, 4 a table could not be written,
5 anything else).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from notelake.conf import ConfigError
from notelake.conf.task import Task
from notelake.jobs.cli_common import failure_exit
from notelake.jobs.extraction.plan import Pass
from notelake.jobs.extraction.report import ExitCode
from notelake.jobs.linking import LinkStats, link_concepts, open_vocabulary
from notelake.jobs.omop import OmopError, OmopStats, publish_omop
from notelake.jobs.vocab import vocabulary_root

log = logging.getLogger("notelake.extract")


@dataclass
class OmopOutcome:
    """What the link and publish stages of a pass did: their stats (None: not run), the stage that failed and the
    exit code it gives the pass."""

    link: LinkStats | None = None
    publish: OmopStats | None = None
    failed: str | None = None  # "<stage>: <exception type>"
    code: ExitCode = ExitCode.OK

    def to_json(self) -> str | None:
        """The runs table's ``omop_json`` (counts, ids and the vocabulary release; no text), None when neither
        stage ran."""
        if self.link is None and self.publish is None and self.failed is None:
            return None
        return json.dumps({"link": None if self.link is None else dataclasses.asdict(self.link),
                           "publish": None if self.publish is None else dataclasses.asdict(self.publish),
                           "failed": self.failed}, sort_keys=True)


def link_and_publish(p: Pass, tasks: list[Task]) -> OmopOutcome:
    """Link, then publish, ``tasks`` in the pass's warehouse as the settings say; never raises for a failure of
    either (see the module docstring): the outcome carries it."""
    omop, outcome = p.settings.omop, OmopOutcome()
    stage = "link"
    try:
        linked = omop.link != "off" and _vocabulary_ready(p)
        if linked:
            outcome.link = link_concepts(p.spark, p.warehouse, p.settings, tasks)
        stage = "publish"
        if omop.publish == "on" or (omop.publish == "auto" and linked):
            outcome.publish = publish_omop(p.spark, p.warehouse, p.settings, [task.name for task in tasks])
    except Exception as exc:  # noqa: BLE001 - the extraction is committed: report the stage, keep the runs
        outcome.code = failure_exit(exc, f"{stage} after the extraction", usage_errors=(OmopError,))
        outcome.failed = f"{stage}: {type(exc).__name__}"
        log.error("the extraction of this pass is committed; its %s stage failed (exit %d): the next run, or "
                  "notelake %s, completes it", stage, outcome.code, "link" if stage == "link" else "omop")
    return outcome


def _vocabulary_ready(p: Pass) -> bool:
    """Whether there is a vocabulary to link against; ConfigError when there must be one (``omop.link: on``, or a
    configured ``omop.vocabulary``)."""
    omop = p.settings.omop
    root = vocabulary_root(p.warehouse.root, omop.vocabulary)
    if open_vocabulary(root, dict(p.warehouse.storage_options)) is not None:
        return True
    if omop.link == "on" or omop.vocabulary:
        why = "omop.link is on" if omop.link == "on" else "omop.vocabulary names it"
        raise ConfigError(f"no vocabulary at {root}, and {why} (load one with notelake vocab load --athena DIR "
                          f"--output {p.warehouse.root}, or set omop.link: off)")
    log.info("no vocabulary at %s: concepts not linked nor published as OMOP (omop.link auto)", root)
    return False

