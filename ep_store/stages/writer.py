"""A background writer: write jobs run in order on one thread while the caller computes (issue 12).

The counterpart of ep_store.stages.prefetch for output. The GPU harvest submits each batch's
Lance commits here and goes on to the next forward pass:

    with BackgroundWriter(depth=2) as writer:
        for batch in batches:
            rows = forward(batch)
            writer.submit(store.append_activations, key, rows, meta)
    writer.wait_s     # seconds the caller was blocked (full queue, or inline jobs): the model idle
    writer.busy_s     # seconds spent inside jobs (the writes themselves)

Jobs run one at a time in submission order, so commits land in stream order. The queue is
bounded (``depth`` jobs), so memory stays flat however slow the disk. The first failing job
stops the writer: later jobs are dropped (nothing is committed after a failure, so every
dataset stays at its last good commit), and the error is raised in the caller at its next
``submit`` or at ``close``. ``depth=0`` runs each job inline in ``submit``: the synchronous
writer, the same code path without the thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

_END = object()


class BackgroundWriter:
    """Run ``submit``ted jobs in order on a writer thread, at most ``depth`` queued."""

    def __init__(self, depth: int = 2):
        if depth < 0:
            raise ValueError("depth must be 0 (synchronous) or more")
        self.depth = depth
        self.wait_s = 0.0
        self.busy_s = 0.0
        self.jobs = 0
        self._error: BaseException | None = None
        self._closed = False
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if depth:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="ep-writer", daemon=True)
            self._thread.start()

    def _do(self, job) -> None:
        fn, args, kwargs = job
        start = time.perf_counter()
        try:
            fn(*args, **kwargs)
            self.jobs += 1
        finally:
            self.busy_s += time.perf_counter() - start

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _END:
                return
            if self._error is not None:
                continue  # after a failure: drop, never commit past it
            try:
                self._do(job)
            except BaseException as error:  # noqa: BLE001 - handed to the caller, re-raised there
                self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)``; blocks while ``depth`` jobs wait. Raises an earlier
        job's error (and then queues nothing), or RuntimeError after ``close``."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        self._raise_if_failed()
        start = time.perf_counter()
        if self._queue is None:
            try:
                self._do((fn, args, kwargs))
            finally:
                self.wait_s += time.perf_counter() - start
            return
        while True:
            try:
                self._queue.put((fn, args, kwargs), timeout=0.05)
                break
            except queue.Full:
                self._raise_if_failed()
        self.wait_s += time.perf_counter() - start

    def close(self) -> None:
        """Wait for every queued job; raise the first job error, if any."""
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                start = time.perf_counter()
                self._queue.put(_END)
                self._thread.join()
                self.wait_s += time.perf_counter() - start
        self._raise_if_failed()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._closed = True  # the caller failed: finish what is queued, keep the caller's error
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()
