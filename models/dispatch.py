"""One :meth:`EnginePool.generate <notelake.models.actor.EnginePool.generate>` call: batches spread over the pool's
actors, engine faults sent again, stalled calls timed out, nothing waited for past the pool's deadline.

Nothing here logs prompt, note or output text: ids, counts and timings only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from notelake.models.engine import (DEADLINE, ENGINE_FAULTS, GenerationRequest, GenerationResult, engine_fault,
                                    error_result)

if TYPE_CHECKING:
    from notelake.models.actor import EnginePool

log = logging.getLogger(__name__)

ENGINE_UNAVAILABLE = "engine_unavailable"


@dataclass
class Call:
    """One batch in flight: the positions of its requests in the caller's list, the actor serving it, how many
    times it was sent, the actors that failed it, and when it was sent or last seen progressing (monotonic)."""

    actor: int
    positions: list[int]
    tries: int
    failed_on: frozenset[int]
    since: float


class Dispatch:
    """One :meth:`EnginePool.generate` call: batches onto the least busy live actors (up to ``ray.max_in_flight``
    each), engine faults sent again to another actor (``ray.call_retries``), stalled calls timed out and their
    actor restarted, nothing waited for past the pool's deadline."""

    def __init__(self, pool: "EnginePool", requests: list[GenerationRequest], size: int):
        self.pool, self.requests, self.rc = pool, requests, pool.settings.ray
        self.results: list[GenerationResult | None] = [None] * len(requests)
        # (positions, tries, actors that failed it)
        self.queue: deque = deque((list(range(s, min(s + size, len(requests)))), 0, frozenset())
                                  for s in range(0, len(requests), size))
        self.pending: dict[Any, Call] = {}
        self.in_flight = [0] * len(pool.actors)

    def run(self) -> list[GenerationResult]:
        self.submit()
        while self.pending:
            if self.pool.deadline is not None and time.time() >= self.pool.deadline:
                self.abandon()
                break
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=self.wait_s())
            for ref in done:
                self.collect(ref)
            if not done:
                self.time_out_stalled()
            self.submit()
        return [r if r is not None else error_result(self.requests[k].request_id, ENGINE_UNAVAILABLE)
                for k, r in enumerate(self.results)]

    def wait_s(self) -> float:
        """Until the first pending call is due a stall check, or the deadline."""
        due = min(c.since for c in self.pending.values()) + self.rc.call_timeout_s - time.monotonic()
        if self.pool.deadline is not None:
            due = min(due, self.pool.deadline - time.time())
        return max(0.05, due)

    def submit(self) -> None:
        while self.queue:
            if self.pool.deadline is not None and time.time() >= self.pool.deadline:
                self.abandon()
                return
            live = [i for i in range(len(self.pool.actors)) if i not in self.pool._dead]
            if not live:  # nobody left: the rest fails as the engine's fault
                while self.queue:
                    self.fail(self.queue.popleft()[0], ENGINE_UNAVAILABLE)
                return
            free = [i for i in live if self.in_flight[i] < self.rc.max_in_flight]
            if not free:
                return
            positions, tries, failed_on = self.queue.popleft()
            i = min([j for j in free if j not in failed_on] or free, key=lambda j: self.in_flight[j])
            ref = self.pool.actors[i].generate.remote([self.requests[k] for k in positions])
            self.pending[ref] = Call(i, positions, tries, failed_on, time.monotonic())
            self.in_flight[i] += 1

    def take(self, ref) -> Call:
        call = self.pending.pop(ref)
        self.in_flight[call.actor] -= 1
        return call

    def collect(self, ref) -> None:
        call = self.take(ref)
        name = self.pool.names[call.actor]
        try:
            out = ray.get(ref)
            if len(out) != len(call.positions):
                raise ValueError("result count mismatch")
        except ray.exceptions.RayActorError as exc:
            if isinstance(exc, getattr(ray.exceptions, "ActorDiedError", ())):
                self.pool._dead.add(call.actor)
            log.error("engine actor %s unavailable (%s)", name, type(exc).__name__)
            self.retry(call, call.positions, f"{ENGINE_UNAVAILABLE}: {type(exc).__name__}")
            return
        except Exception as exc:  # noqa: BLE001 - RayTaskError etc.: the engine's fault, sent again
            log.error("engine actor %s failed a batch (%s)", name, type(exc).__name__)
            self.retry(call, call.positions, f"engine_error: {type(exc).__name__}")
            return
        faulted = []
        for k, result in zip(call.positions, out):
            if engine_fault(result.error) in ENGINE_FAULTS:
                faulted.append(k)
            self.results[k] = result
        if faulted:
            log.error("engine actor %s: %d of %d item(s) failed by the engine", name, len(faulted), len(out))
            self.retry(call, faulted)

    def retry(self, call: Call, positions: list[int], error: str | None = None) -> None:
        """Send ``positions`` again, avoiding the actor that failed them, or, out of tries, keep their engine-fault
        results (``error`` for those without one)."""
        if call.tries < self.rc.call_retries:
            self.queue.append((positions, call.tries + 1, call.failed_on | {call.actor}))
            return
        log.error("%d item(s) still failed by the engines after %d tries: left for the next run", len(positions),
                  call.tries + 1)
        if error is not None:
            self.fail(positions, error)

    def fail(self, positions: list[int], error: str) -> None:
        for k in positions:
            self.results[k] = error_result(self.requests[k].request_id, error)

    def time_out_stalled(self) -> None:
        """Calls waiting ``ray.call_timeout_s``: a still-progressing actor is waited for; a stalled one is restarted
        and its calls sent again as ``engine_timeout``."""
        now, verdicts = time.monotonic(), {}
        for ref, call in list(self.pending.items()):
            if now - call.since < self.rc.call_timeout_s:
                continue
            if call.actor not in verdicts:
                verdicts[call.actor] = self.pool.stalled(call.actor)
            if not verdicts[call.actor]:
                call.since = now
                continue
            self.take(ref)
            ray.cancel(ref)  # before the restart, so that Ray does not retry it there: this pool sends it again
            self.retry(call, call.positions, f"engine_timeout: no request finished in {self.rc.call_timeout_s:.0f} s")
        for actor, stalled in verdicts.items():
            if stalled:
                self.pool.restart(actor)

    def abandon(self) -> None:
        """The deadline passed: cancel what is in flight, answer everything left with ``deadline_passed``."""
        for ref, call in list(self.pending.items()):
            self.take(ref)
            ray.cancel(ref)
            self.fail(call.positions, DEADLINE)
        while self.queue:
            self.fail(self.queue.popleft()[0], DEADLINE)
        log.warning("run deadline passed: engine calls in flight abandoned")
