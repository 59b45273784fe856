"""Ray engine actors: one engine per GPU (one on CPU), named so Spark executors can find them.

* :func:`ensure_ray` starts a local Ray (or connects to ``RayConfig.address``) once and returns the GCS
  address that executor processes pass to :meth:`EnginePool.connect`. Worker output is not forwarded to
  the driver (``log_to_driver=False``), so nothing an engine prints can reach driver logs.
* :class:`EngineActor` wraps one engine (``models.engine.make_engine``); ``generate`` never raises for
  per-item problems -- they come back as ``GenerationResult.error``. Its live counters (``counts``: requests,
  output tokens, errors; summed over the actors by :meth:`EnginePool.counts` for progress lines) advance as each
  request finishes, not when a whole call returns.
* :class:`EnginePool` names its actors ``notelake-engine-<hash of the engine config, 8 hex>[-<owner>]-<i>``
  (per-request fields -- ``max_tokens``, ``guided_decoding`` -- left out; ``owner``: the pass that started them,
  so two jobs on one Ray cluster never share actors by accident) (``get_if_exists``): every process of one owner
  and engine config finds the same actors. ``generate`` splits requests into batches, keeps up to
  ``max_in_flight`` batches queued per actor and returns results in input order. Engine faults (an actor lost, an
  engine step error, no request finished for ``ray.call_timeout_s``) are sent again (``ray.call_retries``, to
  another actor when there is one), a stalled actor is restarted, and what still fails comes back as per-item
  errors of an engine-fault category (``models.engine.ENGINE_FAULTS``): never an exception, never a hang. Past the
  pool's ``deadline`` (the run's wall-clock limit) nothing is waited for: the rest is ``deadline_passed``.
* An actor whose engine fails ``ray.restart_after_failures`` calls in a row exits, and Ray restarts it
  (``ray.max_restarts``); its calls in flight are retried there by Ray (``ray.max_task_retries``).

Nothing here logs prompt, note or output text: ids, counts and timings only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

import ray

from notelake.conf.settings import EngineConfig, RayConfig, Settings
from notelake.models.dispatch import Dispatch
from notelake.models.engine import ENGINE_FAULTS, GenerationRequest, GenerationResult, engine_fault, error_result

log = logging.getLogger(__name__)

ACTOR_PREFIX = "notelake-engine"
READY_TIMEOUT_S = float(os.environ.get("NOTELAKE_ENGINE_READY_TIMEOUT_S", "900"))
#: how long a stalled call's actor gets to answer a progress probe before it counts as hung
PROBE_TIMEOUT_S = 10.0
#: the actors' concurrency group for pings, counters and descriptions: answered while every generate thread is busy
CONTROL = "control"


# ============================================================================================== Ray
def ensure_ray(cfg: RayConfig) -> str:
    """Start (or connect to) Ray once per process; returns the cluster's GCS address (``host:port``)."""
    if not ray.is_initialized():
        common: dict[str, Any] = {"namespace": cfg.namespace, "log_to_driver": False,
                                  "logging_level": logging.WARNING}
        if cfg.address:
            ray.init(address=cfg.address, **common)
        else:
            # "local" always starts this job's own Ray: never attach to (and share named actors with) another
            # job's local cluster found on the machine.
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, **common)
        log.info("ray ready (namespace %s)", cfg.namespace)
    return ray.get_runtime_context().gcs_address


# Carried by each request, so configs differing only here share one engine actor (no second model load).
PER_REQUEST_FIELDS = frozenset({"max_tokens", "guided_decoding", "concepts_from", "relations_from", "heads"})


def engine_config_hash(cfg: EngineConfig) -> str:
    payload = json.dumps(cfg.model_dump(mode="json", exclude=set(PER_REQUEST_FIELDS)), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def actor_names(settings: Settings, owner: str | None = None) -> list[str]:
    """The engine actors' names: by engine config, and by ``owner`` (a pass id) when given."""
    scope = engine_config_hash(settings.engine) + (f"-{owner}" if owner else "")
    return [f"{ACTOR_PREFIX}-{scope}-{i}" for i in range(settings.ray.num_actors)]


# ============================================================================================== actor
class EngineActor:
    """One engine in one Ray worker process. Wrapped with ``ray.remote`` by :func:`remote_engine_actor`."""

    def __init__(self, engine_cfg: dict, restart_after_failures: int = 3):
        from notelake.models.engine import make_engine

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _normal_priority()
        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.engine = make_engine(self.cfg)
        self._counts = ProgressCounts()
        self.restart_after_failures = restart_after_failures
        self._failed_calls = 0  # calls in a row whose every result was an engine fault

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        call = CallProgress(self._counts)
        try:
            results = self.engine.generate(list(requests), on_result=call.finished)
        except Exception as exc:  # noqa: BLE001 - never raise for the batch; the message may quote text
            log.error("engine failed on a batch of %d (%s)", len(requests), type(exc).__name__)
            results = [error_result(r.request_id, f"engine_error: {type(exc).__name__}") for r in requests]
        if len(results) != len(requests):
            results = [error_result(r.request_id, "engine_error: result count mismatch") for r in requests]
        call.close(results)
        self._check_health(results)
        return results

    def _check_health(self, results: list[GenerationResult]) -> None:
        """Exit after ``restart_after_failures`` calls in a row that failed as a whole: an engine that fails every
        step (dead engine loop, a device that keeps running out of memory) is restarted by Ray, and the calls in
        flight are retried on the new one (``max_task_retries``)."""
        failed = bool(results) and all(engine_fault(r.error) in ENGINE_FAULTS for r in results)
        with self._counts.lock:
            self._failed_calls = self._failed_calls + 1 if failed else 0
            restart = self._failed_calls >= self.restart_after_failures
        if restart:
            log.error("engine failed %d calls in a row: the actor exits to be restarted", self._failed_calls)
            os._exit(1)  # an exit Ray did not ask for: it restarts the actor (ray.max_restarts)

    @ray.method(concurrency_group=CONTROL)
    def counts(self) -> dict[str, int]:
        """Requests answered, output tokens and per-item errors since the actor started, counted as each request
        finishes (live progress)."""
        return self._counts.snapshot()

    @ray.method(concurrency_group=CONTROL)
    def idle_seconds(self) -> float:
        """Seconds since the engine last finished a request (since the actor started, before its first)."""
        return self._counts.idle_seconds()

    @ray.method(concurrency_group=CONTROL)
    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    @ray.method(concurrency_group=CONTROL)
    def describe(self) -> dict:
        return self.engine.describe()

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> bool:
        return True

    @ray.method(concurrency_group=CONTROL)
    def pid(self) -> int:
        return os.getpid()


def _normal_priority() -> None:
    """Ray starts worker processes at niceness 15: beside any nice-0 process (a training run, another job) the
    engine then gets a sliver of the CPU. The engine actor is the job's main work: it runs at niceness 0 (its
    engine-core process inherits that)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError) as exc:  # no CAP_SYS_NICE: keep Ray's niceness, say so once
        log.warning("engine actor keeps niceness %s (%s): it may starve beside other processes",
                    os.getpriority(os.PRIO_PROCESS, 0), type(exc).__name__)


class ProgressCounts:
    """Requests, output tokens and per-item errors of one engine, safe to add to from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._counts = {"requests": 0, "output_tokens": 0, "errors": 0}
        self._last_finished = time.monotonic()

    def add(self, result: GenerationResult) -> None:
        """Count one result; the caller holds :attr:`lock`."""
        self._last_finished = time.monotonic()
        self._counts["requests"] += 1
        self._counts["output_tokens"] += result.output_tokens
        self._counts["errors"] += 1 if result.error else 0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self._counts)

    def idle_seconds(self) -> float:
        with self.lock:
            return time.monotonic() - self._last_finished


class CallProgress:
    """Counts one generate call's results once each: as the engine finishes them (:meth:`finished`, the engine's
    ``on_result``), and when the call returns (:meth:`close`) those it did not report, e.g. every result of a call
    that failed as a whole. A result reported after the call returned is not counted again."""

    def __init__(self, counts: ProgressCounts) -> None:
        self.counts = counts
        self.reported: Counter[str] = Counter()  # request id -> results counted by finished()
        self.closed = False

    def finished(self, result: GenerationResult) -> None:
        with self.counts.lock:
            if not self.closed:
                self.reported[result.request_id] += 1
                self.counts.add(result)

    def close(self, results: list[GenerationResult]) -> None:
        with self.counts.lock:
            self.closed = True
            for result in results:
                if self.reported[result.request_id] > 0:
                    self.reported[result.request_id] -= 1
                else:
                    self.counts.add(result)


_REMOTE_CLS = None


def remote_engine_actor():
    """``ray.remote(EngineActor)`` with its :data:`CONTROL` concurrency group, created on first use."""
    global _REMOTE_CLS
    if _REMOTE_CLS is None:
        _REMOTE_CLS = ray.remote(concurrency_groups={CONTROL: 2})(EngineActor)
    return _REMOTE_CLS


# ============================================================================================== pool
class CounterTotals:
    """The actors' live counters summed so that the sums never go back. An actor that does not answer in time
    (its threads all busy with generate calls from the executors) keeps its last answer, one that died keeps what
    it had counted, and one restarted by Ray (counting from zero again) adds to what it counted before: progress
    lines measured against a baseline would otherwise show negative prompts and rates."""

    def __init__(self) -> None:
        self.last: dict[int, dict[str, int]] = {}
        self.before_restart: dict[int, dict[str, int]] = {}

    def update(self, actor: int, counts: dict[str, int]) -> None:
        last = self.last.get(actor)
        if last is not None and counts["requests"] < last["requests"]:
            earlier = self.before_restart.get(actor, {})
            self.before_restart[actor] = {k: earlier.get(k, 0) + v for k, v in last.items()}
        self.last[actor] = dict(counts)

    def total(self) -> dict[str, int]:
        total = {"requests": 0, "output_tokens": 0, "errors": 0}
        for part in (*self.last.values(), *self.before_restart.values()):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
        return total


class EnginePool:
    """Handles to the named engine actors of one engine config (and owner). ``deadline`` (epoch seconds, None = no
    limit): :meth:`generate` waits for nothing past it (:meth:`with_deadline`)."""

    def __init__(self, actors: list, names: list[str], settings: Settings):
        self.actors = actors
        self.names = names
        self.settings = settings
        self.deadline: float | None = None
        self._dead: set[int] = set()
        self._totals = CounterTotals()

    # ------------------------------------------------------------------ construction
    @classmethod
    def get_or_create(cls, settings: Settings, owner: str | None = None, detached: bool = False) -> "EnginePool":
        """Create the pool's actors (or get them when they exist). Returns at once; :meth:`ready` waits for load.
        ``owner`` (a pass id) names actors that only its own processes use; ``detached`` actors outlive the
        process that created them (shared on purpose, ``ray.engine_scope: cluster``), others die with it."""
        ensure_ray(settings.ray)
        rc = settings.ray
        remote = remote_engine_actor()
        names = actor_names(settings, owner)
        actors = []
        for name in names:
            actors.append(remote.options(
                name=name, namespace=rc.namespace, get_if_exists=True, lifetime="detached" if detached else None,
                max_restarts=rc.max_restarts, max_task_retries=rc.max_task_retries,
                # with tensor parallelism vLLM starts one Ray worker per GPU itself: the actor holds none
                num_cpus=rc.num_cpus_per_actor,
                num_gpus=rc.num_gpus_per_actor if settings.engine.tensor_parallel_size == 1 else 0,
                # every running generate call feeds the one engine loop (continuous batching across calls): a
                # thread per call a partition keeps in flight. Calls beyond it wait in Ray's queue while the engine
                # is already full; pings and counters have their own threads.
                max_concurrency=rc.max_in_flight * (rc.batches_ahead + 1),
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            ).remote(settings.engine.model_dump(mode="json"), rc.restart_after_failures))
        log.info("engine pool: %d actor(s) %s", len(actors), names[0].rsplit("-", 1)[0])
        return cls(actors, names, settings)

    @classmethod
    def connect(cls, gcs_address: str, settings: Settings, owner: str | None = None, timeout_s: float = 60.0,
                missing_dead: bool = False) -> "EnginePool":
        """Attach to an existing pool (of ``owner``) from another process (a Spark executor's Python worker). An
        actor not found in ``timeout_s`` raises EngineStartError, or with ``missing_dead`` (the driver saw the pool
        ready: a missing actor died) counts as dead: its share of the work comes back as engine faults."""
        rc = settings.ray
        if not ray.is_initialized():
            _adopt_token_auth()
            ray.init(address=gcs_address, namespace=rc.namespace, log_to_driver=False, logging_level=logging.WARNING)
        names = actor_names(settings, owner)
        actors, deadline = [], time.monotonic() + timeout_s
        for name in names:
            while True:
                try:
                    actors.append(ray.get_actor(name, namespace=rc.namespace))
                    break
                except ValueError:
                    if time.monotonic() <= deadline:
                        time.sleep(0.5)
                        continue
                    if missing_dead:
                        log.error("engine actor %s not found: counted as dead", name)
                        actors.append(None)
                        break
                    raise EngineStartError(
                        f"engine actor {name} not found in namespace {rc.namespace} at {gcs_address}: "
                        "the driver must create the pool (EnginePool.get_or_create) with the same engine config"
                    ) from None
        pool = cls(actors, names, settings)
        pool._dead.update(i for i, actor in enumerate(actors) if actor is None)
        return pool

    def with_deadline(self, deadline: float | None) -> "EnginePool":
        """This pool (same actors, same view of dead ones) waiting for nothing past ``deadline`` (epoch s)."""
        view = copy.copy(self)
        view.deadline = deadline
        return view

    # ------------------------------------------------------------------ use
    def ready(self, timeout_s: float | None = None, progress_s: float = 30.0) -> "EnginePool":
        """Block until every actor has loaded its engine (a line every ``progress_s`` while it loads); raises
        EngineStartError naming the actor that failed."""
        timeout_s = READY_TIMEOUT_S if timeout_s is None else timeout_s
        t0 = time.monotonic()
        for name, actor in zip(self.names, self.actors):
            ping = actor.ping.remote()
            try:
                while not ray.wait([ping], timeout=min(progress_s, max(1.0, timeout_s - (time.monotonic() - t0))))[0]:
                    if time.monotonic() - t0 >= timeout_s:
                        raise ray.exceptions.GetTimeoutError()
                    log.info("engine actor %s loading: %.0f s", name, time.monotonic() - t0)
                ray.get(ping)
            except ray.exceptions.GetTimeoutError:
                raise EngineStartError(f"engine actor {name} not ready after {timeout_s:.0f} s (not enough CPUs/GPUs "
                                   "free in the Ray cluster, or a slow model load)") from None
            except ray.exceptions.RayActorError as exc:
                raise EngineStartError(f"engine actor {name} failed to start: {_cause(exc)}") from None
        log.info("engine pool ready in %.1f s", time.monotonic() - t0)
        return self

    def counts(self) -> dict[str, int]:
        """Requests, output tokens and errors answered so far, summed over the actors (never going back)."""
        for i, actor in enumerate(self.actors):
            if i in self._dead:
                continue
            try:
                self._totals.update(i, ray.get(actor.counts.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - progress is best effort: a busy or restarting actor answers later
                continue
        return self._totals.total()

    def generate(self, requests: list[GenerationRequest], batch_size: int | None = None) -> list[GenerationResult]:
        """Results in input order; per-item errors instead of exceptions: the request's own, or, after
        ``ray.call_retries`` more tries, an engine fault (:data:`models.engine.ENGINE_FAULTS`); past
        :attr:`deadline`, ``deadline_passed``."""
        if not requests:
            return []
        return Dispatch(self, requests, max(1, batch_size or self.settings.ray.batch_size)).run()

    def stalled(self, i: int) -> bool:
        """Whether actor ``i`` is hung: alive to Ray (not restarting) but it finished no request for
        ``ray.call_timeout_s``, or did not answer a probe at all (a stopped or frozen process)."""
        state = _actor_state(self.actors[i])
        if state is not None and state != "ALIVE":
            return False  # restarting (loading its engine) or dead: Ray reports that on the call itself
        try:
            idle = ray.get(self.actors[i].idle_seconds.remote(),
                           timeout=min(PROBE_TIMEOUT_S, self.settings.ray.call_timeout_s))
        except Exception:  # noqa: BLE001 - no answer at all: the process is stopped or frozen
            return True
        return idle >= self.settings.ray.call_timeout_s

    def restart(self, i: int) -> None:
        """Kill actor ``i`` for Ray to start it again (``ray.max_restarts``); its calls in flight fail or are retried
        by Ray."""
        log.warning("engine actor %s finished no request in %.0f s: restarting it", self.names[i],
                    self.settings.ray.call_timeout_s)
        try:
            ray.kill(self.actors[i], no_restart=False)
        except Exception as exc:  # noqa: BLE001 - already gone: its calls report that
            log.warning("engine actor %s could not be restarted (%s)", self.names[i], type(exc).__name__)

    def count_tokens(self, text: str) -> int:
        return ray.get(self.actors[0].count_tokens.remote(text), timeout=self.settings.ray.call_timeout_s)

    def describe(self) -> dict:
        """The first actor's engine description plus every actor's name and pid."""
        descs = ray.get([a.describe.remote() for a in self.actors], timeout=self.settings.ray.call_timeout_s)
        out = dict(descs[0])
        out.pop("pid", None)
        out["actors"] = [{"name": n, "pid": d.get("pid")} for n, d in zip(self.names, descs)]
        return out

    def actor_ids(self) -> tuple[str, ...]:
        """Ray's ids of the pool's actors: a restart by Ray keeps an actor's id, a new actor of the same name has
        another."""
        return tuple(_actor_id(actor) for actor in self.actors)

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors], timeout=self.settings.ray.call_timeout_s)

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Kill the pool's actors and wait (up to ``wait_s``) until their names are free: ``ray.kill`` returns
        before the actor is gone, and a pool started meanwhile with the same names would get the dying actors."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        deadline = time.monotonic() + wait_s
        for name in self.names:
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=self.settings.ray.namespace)
                except ValueError:  # no live actor of that name
                    break
                time.sleep(0.1)
        self.actors = []
        self.names = []


def _actor_id(actor) -> str:
    return actor._actor_id.hex()  # no public attribute holds a handle's actor id


def _actor_state(actor) -> str | None:
    """The actor's state in Ray's GCS (ALIVE, RESTARTING, DEAD, ...), None when it cannot be read."""
    try:
        from ray._private import state  # no public API reads one actor's state without the dashboard

        return state.actors(_actor_id(actor)).get("State")
    except Exception:  # noqa: BLE001 - a private API: without it, the progress probe alone decides
        return None


def _adopt_token_auth() -> None:
    """Use Ray token auth when connecting from a process that did not inherit ``RAY_AUTH_MODE``.

    Ray >= 2.5x enables token auth by default for a cluster started with ``ray.init()`` (the token lives in
    ``~/.ray/auth_token``) and sets ``RAY_AUTH_MODE=token`` only in the starting process and its children. A
    Spark executor's Python worker forked from a JVM started earlier lacks it and would be refused.
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_path):
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # refresh Ray's cached config so this process sees the mode (what ray.init does for new clusters)
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # noqa: BLE001 - private API; the env var alone suffices on a fresh import
            pass


class EngineStartError(RuntimeError):
    """An engine actor could not be found or started (its message names the actor and cause, never note text)."""


def _cause(exc: BaseException) -> str:
    """First line of an actor error's cause (constructor errors carry no note text)."""
    text = str(exc).strip().splitlines()
    for line in reversed(text):
        if "Error" in line or "error" in line:
            return line.strip()[:500]
    return (text[-1] if text else type(exc).__name__)[:500]
