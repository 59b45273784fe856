"""Ray engine actors: one engine per GPU (one on CPU), named so Spark executors can find them.

* :func:`ensure_ray` starts a local Ray (or connects to ``RayConfig.address``) once and returns the GCS
  address that executor processes pass to :meth:`EnginePool.connect`. Worker output is not forwarded to
  the driver (``log_to_driver=False``), so nothing an engine prints can reach driver logs.
* :class:`EngineActor` wraps one engine (``models.engine.make_engine``); ``generate`` never raises for
  per-item problems -- they come back as ``GenerationResult.error``. Its live counters (``counts``: requests,
  output tokens, errors; summed over the actors by :meth:`EnginePool.counts` for progress lines) advance as each
  request finishes, not when a whole call returns.
* :class:`EnginePool` names its actors ``notelake-engine-<hash of the engine config, 8 hex>-<i>`` (per-request
  fields -- ``max_tokens``, ``guided_decoding`` -- left out)
  (``get_if_exists``), so every process using the same engine config shares the same actors. ``generate``
  splits requests into batches, keeps up to ``max_in_flight`` batches queued per actor, returns results in
  input order and turns a dead actor into per-item ``engine_unavailable`` errors.

Nothing here logs prompt, note or output text: ids, counts and timings only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from typing import Any

import ray

from notelake.conf.settings import EngineConfig, RayConfig, Settings
from notelake.models.engine import GenerationRequest, GenerationResult, error_result

log = logging.getLogger(__name__)

ACTOR_PREFIX = "notelake-engine"
ENGINE_UNAVAILABLE = "engine_unavailable"
READY_TIMEOUT_S = float(os.environ.get("NOTELAKE_ENGINE_READY_TIMEOUT_S", "900"))


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
PER_REQUEST_FIELDS = frozenset({"max_tokens", "guided_decoding"})


def engine_config_hash(cfg: EngineConfig) -> str:
    payload = json.dumps(cfg.model_dump(mode="json", exclude=set(PER_REQUEST_FIELDS)), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def actor_names(settings: Settings) -> list[str]:
    h = engine_config_hash(settings.engine)
    return [f"{ACTOR_PREFIX}-{h}-{i}" for i in range(settings.ray.num_actors)]


# ============================================================================================== actor
class EngineActor:
    """One engine in one Ray worker process. Wrapped with ``ray.remote`` by :func:`remote_engine_actor`."""

    def __init__(self, engine_cfg: dict):
        from notelake.models.engine import make_engine

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _normal_priority()
        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.engine = make_engine(self.cfg)
        self._counts = ProgressCounts()

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
        return results

    def counts(self) -> dict[str, int]:
        """Requests answered, output tokens and per-item errors since the actor started, counted as each request
        finishes (live progress)."""
        return self._counts.snapshot()

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def describe(self) -> dict:
        return self.engine.describe()

    def ping(self) -> bool:
        return True

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

    def add(self, result: GenerationResult) -> None:
        """Count one result; the caller holds :attr:`lock`."""
        self._counts["requests"] += 1
        self._counts["output_tokens"] += result.output_tokens
        self._counts["errors"] += 1 if result.error else 0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self._counts)


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
    """``ray.remote(EngineActor)``, created on first use."""
    global _REMOTE_CLS
    if _REMOTE_CLS is None:
        _REMOTE_CLS = ray.remote(EngineActor)
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
    """Handles to the named engine actors of one engine config."""

    def __init__(self, actors: list, names: list[str], settings: Settings):
        self.actors = actors
        self.names = names
        self.settings = settings
        self._dead: set[int] = set()
        self._totals = CounterTotals()

    # ------------------------------------------------------------------ construction
    @classmethod
    def get_or_create(cls, settings: Settings) -> "EnginePool":
        """Create the pool's actors (or get them when they exist). Returns at once; :meth:`ready` waits for load."""
        ensure_ray(settings.ray)
        rc = settings.ray
        remote = remote_engine_actor()
        names = actor_names(settings)
        actors = []
        for name in names:
            actors.append(remote.options(
                name=name, namespace=rc.namespace, get_if_exists=True,
                max_restarts=rc.max_restarts, max_task_retries=rc.max_task_retries,
                # with tensor parallelism vLLM starts one Ray worker per GPU itself: the actor holds none
                num_cpus=rc.num_cpus_per_actor,
                num_gpus=rc.num_gpus_per_actor if settings.engine.tensor_parallel_size == 1 else 0,
                # every running generate call feeds the one engine loop (continuous batching across calls): a
                # thread per call a partition keeps in flight, and one for counts/ping/describe. Calls beyond it
                # wait in Ray's queue while the engine is already full.
                max_concurrency=rc.max_in_flight * (rc.batches_ahead + 1) + 1,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            ).remote(settings.engine.model_dump(mode="json")))
        log.info("engine pool: %d actor(s) %s", len(actors), names[0].rsplit("-", 1)[0])
        return cls(actors, names, settings)

    @classmethod
    def connect(cls, gcs_address: str, settings: Settings, timeout_s: float = 60.0) -> "EnginePool":
        """Attach to an existing pool from another process (a Spark executor's Python worker)."""
        rc = settings.ray
        if not ray.is_initialized():
            _adopt_token_auth()
            ray.init(address=gcs_address, namespace=rc.namespace, log_to_driver=False, logging_level=logging.WARNING)
        names = actor_names(settings)
        actors, deadline = [], time.monotonic() + timeout_s
        for name in names:
            while True:
                try:
                    actors.append(ray.get_actor(name, namespace=rc.namespace))
                    break
                except ValueError:
                    if time.monotonic() > deadline:
                        raise EngineStartError(
                            f"engine actor {name} not found in namespace {rc.namespace} at {gcs_address}: "
                            "the driver must create the pool (EnginePool.get_or_create) with the same engine config"
                        ) from None
                    time.sleep(0.5)
        return cls(actors, names, settings)

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
        """Results in input order; per-item errors (including ``engine_unavailable``) instead of exceptions."""
        if not requests:
            return []
        rc = self.settings.ray
        size = max(1, batch_size or rc.batch_size)
        queue = deque((start, requests[start:start + size]) for start in range(0, len(requests), size))
        results: list[GenerationResult | None] = [None] * len(requests)
        in_flight = [0] * len(self.actors)
        pending: dict[Any, tuple[int, int, list[GenerationRequest]]] = {}

        def fill(start: int, batch: list[GenerationRequest], out: list[GenerationResult]) -> None:
            for k, r in enumerate(out):
                results[start + k] = r

        def submit() -> None:
            while queue:
                free = [i for i in range(len(self.actors)) if i not in self._dead and in_flight[i] < rc.max_in_flight]
                if not free:
                    if len(self._dead) == len(self.actors):  # nobody left: fail the rest as data
                        while queue:
                            start, batch = queue.popleft()
                            fill(start, batch, [error_result(r.request_id, ENGINE_UNAVAILABLE) for r in batch])
                    return
                i = min(free, key=lambda j: in_flight[j])
                start, batch = queue.popleft()
                pending[self.actors[i].generate.remote(batch)] = (i, start, batch)
                in_flight[i] += 1

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, start, batch = pending.pop(ref)
                in_flight[i] -= 1
                try:
                    out = ray.get(ref)
                    if len(out) != len(batch):
                        raise ValueError("result count mismatch")
                except ray.exceptions.RayActorError as exc:
                    if isinstance(exc, getattr(ray.exceptions, "ActorDiedError", ())):
                        self._dead.add(i)
                    log.error("engine actor %s unavailable (%s): %d item(s) failed", self.names[i],
                              type(exc).__name__, len(batch))
                    out = [error_result(r.request_id, ENGINE_UNAVAILABLE) for r in batch]
                except Exception as exc:  # noqa: BLE001 - RayTaskError etc.: the batch fails as data
                    log.error("engine actor %s failed a batch (%s)", self.names[i], type(exc).__name__)
                    out = [error_result(r.request_id, f"engine_error: {type(exc).__name__}") for r in batch]
                fill(start, batch, out)
            submit()
        missing = [k for k, r in enumerate(results) if r is None]
        for k in missing:  # defensive: never return a hole
            results[k] = error_result(requests[k].request_id, ENGINE_UNAVAILABLE)
        return results  # type: ignore[return-value]

    def count_tokens(self, text: str) -> int:
        return ray.get(self.actors[0].count_tokens.remote(text))

    def describe(self) -> dict:
        """The first actor's engine description plus every actor's name and pid."""
        descs = ray.get([a.describe.remote() for a in self.actors])
        out = dict(descs[0])
        out.pop("pid", None)
        out["actors"] = [{"name": n, "pid": d.get("pid")} for n, d in zip(self.names, descs)]
        return out

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        self.names = []


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
