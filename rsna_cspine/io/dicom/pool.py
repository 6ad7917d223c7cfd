"""Forked worker processes for the loader's two passes (headers, pixels), with a fast path for arrays.

pydicom's parser and the decoders (pylibjpeg-libjpeg, -openjpeg, GDCM) all hold the GIL, so threads
would not run in parallel: larger folders are read by forked processes, in chunks of files. A worker
runs the handler its task names; each reply a handler yields goes back over the worker's pipe, pickled,
except numpy arrays, whose bytes are written unframed and read straight into the caller's buffer.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from rsna_cspine.io.dicom.report import LoadReport

#: Smallest folders loaded by a worker pool. Starting and stopping two forked workers costs ~15 ms
#: and each file ~0.1 ms of messaging; parsing a header costs ~0.7 ms, decoding a compressed slice
#: 6-25 ms, so below these counts the pool costs more than it saves.
MIN_FILES_FOR_POOL_COMPRESSED = 8
MIN_FILES_FOR_POOL_UNCOMPRESSED = 64

#: A task's work in a worker: payload → replies (a numpy array travels raw, anything else pickled).
Handler = Callable[[Any], Iterable[Any]]


def resolve_workers(workers: int | None) -> int:
    """Worker processes to use: ``workers``, or min(usable CPUs, 4) for None; 1 inside a daemonic process.

    Args:
        workers: requested count (≥ 1) or None.
    """
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        requested = workers
    else:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        requested = min(available, 4)
    # A daemonic process (e.g. a torch DataLoader worker) may not start children.
    return 1 if multiprocessing.current_process().daemon else requested


class WorkerDied(Exception):
    """A worker process ended while it owed replies (killed, crashed in native code, ...)."""


class WorkerPool:
    """Forked worker processes, each answering on its own pipe; tasks go to whichever worker is free.

    Hand-written rather than a ``ProcessPoolExecutor`` because of how the results travel. A decoded
    slice (1 MiB for 512² float32) is read from the pipe straight into its row of the output volume.
    Moving 200 such slices cost 0.14 CPU-s this way against 1.0 s as pickled float32 results, 0.43 s
    as pickled int16 rescaled by the parent, and ~0.4 s through a shared-memory volume (memfd or
    /dev/shm), whose 4 KiB pages (no transparent huge pages for shmem) fault in slowly (measured on
    the 2-core dev VM).

    The workers are forked: they start in milliseconds and, unlike spawn/forkserver, do not re-import
    the caller's ``__main__``; the handlers are inherited, never pickled. They only run pydicom, numpy
    and the codecs, so threads of the parent (torch) do not matter.

    Args:
        count: worker processes.
        handlers: task kind → the function a worker runs on the task's payload.
    """

    def __init__(self, count: int, handlers: Mapping[str, Handler]) -> None:
        context = multiprocessing.get_context("fork")
        self.count = count
        self.broken = False
        self._connections: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        try:
            for _ in range(count):
                parent_end, child_end = context.Pipe(duplex=True)
                self._connections.append(parent_end)
                # The worker closes the parent's ends it inherits: only its own exit then reads as EOF here.
                inherited = list(self._connections)
                process = context.Process(target=_worker_main, args=(child_end, inherited, dict(handlers)), daemon=True)
                try:
                    process.start()
                finally:
                    child_end.close()
                self._processes.append(process)
        except BaseException:
            self.close(graceful=True)
            raise

    def run(
        self,
        tasks: Sequence[tuple[str, Any]],
        replies: Sequence[int],
        receive: Callable[[Connection, int, int], None],
    ) -> None:
        """Send each task to a free worker; ``receive(connection, task, k)`` reads the task's k-th reply.

        Replies are read as they arrive, from whichever worker sent one, so no worker waits on a full
        pipe while the parent reads another's.

        Args:
            tasks: ``(kind, payload)`` pairs; ``kind`` names a handler.
            replies: how many times ``receive`` is called for each task.
            receive: reads one reply of a task (``connection.recv()``, :func:`recv_raw_into`).

        Raises:
            WorkerDied: a worker ended before sending all the replies it owed.
        """
        queue = deque(range(len(tasks)))
        current: dict[Connection, list[int]] = {}  # connection → [task index, replies read]

        def assign(connection: Connection) -> None:
            if queue:
                index = queue.popleft()
                connection.send(tasks[index])
                current[connection] = [index, 0]

        try:
            for connection in self._connections:
                assign(connection)
            while current:
                for connection in wait(list(current)):
                    index, read = current[connection]
                    receive(connection, index, read)  # type: ignore[arg-type]
                    if read + 1 < replies[index]:
                        current[connection][1] = read + 1
                    else:
                        del current[connection]
                        assign(connection)
        except (EOFError, OSError) as exc:  # a closed pipe: its worker is gone
            self.broken = True
            codes = [p.exitcode for p in self._processes if p.exitcode is not None]
            raise WorkerDied(f"a worker process ended (exit code {codes or 'unknown'})") from exc

    def close(self, *, graceful: bool) -> None:
        """Stop the workers: ask idle ones to exit, terminate any that may be busy or blocked."""
        for connection, process in zip(self._connections, self._processes):
            if graceful and not self.broken:
                with contextlib.suppress(OSError):
                    connection.send(None)
            else:
                process.terminate()
        for process in self._processes:
            process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self._connections:
            connection.close()


def _worker_main(connection: Connection, inherited: list[Connection], handlers: dict[str, Handler]) -> None:
    """A worker's loop: answer tasks until told to stop (None) or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    for other in inherited:  # the parent's ends, copied by the fork
        other.close()
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        kind, payload = task
        for reply in handlers[kind](payload):
            if isinstance(reply, np.ndarray):
                _send_raw(connection, reply)
            else:
                connection.send(reply)


def _send_raw(connection: Connection, array: np.ndarray) -> None:
    """Write a C-contiguous array's bytes to the pipe, unframed: the reader knows their number.

    Hand-written next to ``Connection.send_bytes`` because its reader (``recv_bytes_into``) goes
    through an intermediate buffer: two copies of every slice in the parent instead of one.
    """
    view = memoryview(array).cast("B")
    sent = 0
    while sent < len(view):
        sent += os.write(connection.fileno(), view[sent:])


def recv_raw_into(connection: Connection, out: np.ndarray) -> None:
    """Read exactly ``out.nbytes`` bytes of an array a worker replied with straight into ``out``.

    Args:
        connection: the worker's pipe.
        out: C-contiguous destination of the array's shape and dtype.
    """
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        n = os.readv(connection.fileno(), [view[got:]])
        if n == 0:
            raise EOFError("worker pipe closed in the middle of a slice")
        got += n


@contextlib.contextmanager
def worker_pool(
    paths: list[Path], workers: int, report: LoadReport, handlers: Mapping[str, Handler]
) -> Iterator[WorkerPool | None]:
    """A pool for loading ``paths`` when it pays off, else None; stopped on exit.

    Args:
        paths: the folder's files (the first one decides whether the series looks compressed).
        workers: processes wanted (see :func:`resolve_workers`).
        report: where a refused fork is reported.
        handlers: what the workers run (see :class:`WorkerPool`).
    """
    threshold = MIN_FILES_FOR_POOL_COMPRESSED if _looks_compressed(paths[0]) else MIN_FILES_FOR_POOL_UNCOMPRESSED
    if workers < 2 or len(paths) < threshold or not sys.platform.startswith("linux"):
        yield None
        return
    try:
        pool = WorkerPool(workers, handlers)
    except OSError as exc:  # fork refused (process or memory limits): the same work, in-process
        report.warn(f"cannot start {workers} worker processes ({exc}); loading in-process")
        yield None
        return
    graceful = False
    try:
        yield pool
        graceful = True
    finally:
        pool.close(graceful=graceful)


def _looks_compressed(path: Path) -> bool:
    """Whether the first file of a folder is compressed (its file meta only; False when unreadable)."""
    try:
        return UID(str(read_file_meta_info(path).get("TransferSyntaxUID", ""))).is_compressed
    except Exception:  # noqa: BLE001 - any unreadable or non-DICOM first file: decide as uncompressed
        return False


def chunks(n: int, per_task: int, workers: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(n)``, at least two tasks per worker when n allows.

    Args:
        n: items to split.
        per_task: most items per task.
        workers: worker processes.
    """
    size = max(1, min(per_task, math.ceil(n / (2 * workers))))
    return [(start, min(start + size, n)) for start in range(0, n, size)]
