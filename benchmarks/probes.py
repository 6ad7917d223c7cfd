"""Peak-memory probes and fresh-process runs of the benchmark scripts (imported as ``probes``, beside
``common``; nothing here is part of the ``rsna_cspine`` package)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import MIB, REPO_ROOT, json_default

#: A fresh-process measurement prints exactly one line starting with this, followed by JSON.
RESULT_MARKER = "BENCH_RESULT "


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss`."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0); True if it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class RssSampler:
    """Polls resident memory from a background thread, so peaks can be split by time window.

    Used around a call whose stages we only learn the duration of afterwards (``predict_study`` returns
    per-stage seconds): the peak of a stage is the largest sample inside its window. Sampling every
    ``interval_s`` misses spikes shorter than that; the exact overall peak comes from :func:`peak_rss_mib`.

    Child processes (the DICOM decoder pool) are sampled too, every ``children_every``-th tick, by
    their USS (memory unique to them): a forked worker's RSS counts the parent's pages it shares, so
    summing RSS would count the parent twice, while USS is what the workers add.

    Attributes:
        interval_s: seconds between samples.
        children_every: sample the children on every n-th tick (reading their USS costs more).
    """

    interval_s: float = 0.005
    children_every: int = 10
    samples: list[tuple[float, float]] = field(default_factory=list)
    #: ``(time, parent RSS, children USS summed)`` in MiB.
    combined: list[tuple[float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        import psutil

        process = psutil.Process()

        def children_uss() -> float:
            total = 0.0
            for child in process.children(recursive=True):
                try:
                    total += child.memory_full_info().uss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue  # a worker that just exited
            return total / MIB

        def poll() -> None:
            tick = 0
            while not self._stop.is_set():
                now, rss = time.perf_counter(), process.memory_info().rss / MIB
                self.samples.append((now, rss))
                if tick % self.children_every == 0:
                    self.combined.append((now, rss, children_uss()))
                tick += 1
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=poll, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak_between(self, start: float, stop: float) -> float | None:
        """Largest RSS (MiB) sampled in ``[start, stop]`` (``time.perf_counter`` values); None if no sample."""
        values = [rss for t, rss in self.samples if start <= t <= stop]
        return max(values) if values else None

    def children_peak(self) -> float:
        """Largest summed USS (MiB) of the child processes seen (0 when there were none)."""
        return max((uss for _, _, uss in self.combined), default=0.0)

    def combined_peak(self) -> float:
        """Largest parent RSS + children USS at one sampling tick (MiB)."""
        return max((rss + uss for _, rss, uss in self.combined), default=0.0)


# ----------------------------------------------------------------------------------------------
# Fresh-process measurements
# ----------------------------------------------------------------------------------------------


def emit_result(payload: dict[str, Any]) -> None:
    """Hand a child measurement's figures to the parent (one marked JSON line on stdout)."""
    print(RESULT_MARKER + json.dumps(payload, default=json_default), flush=True)


def run_fresh(script: Path, args: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script args...`` in a new process and return the JSON it emitted.

    A fresh interpreter per measurement means the peak RSS is that measurement's alone (no memory
    held over from an earlier one) and every run pays the same first-call costs.

    Args:
        script: the benchmark script (it must call :func:`emit_result` once).
        args: its arguments (usually a ``--child`` mode).
        env: extra environment variables.
    """
    command = [sys.executable, str(script), *args]
    process = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=None,  # progress and logs go straight to the terminal
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    results = [line[len(RESULT_MARKER):] for line in process.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    other = [line for line in process.stdout.splitlines() if not line.startswith(RESULT_MARKER)]
    if other:
        print("\n".join(other), flush=True)
    if process.returncode != 0 or len(results) != 1:
        raise SystemExit(f"measurement failed (exit {process.returncode}): {shlex.join(command)}")
    return json.loads(results[0])
