"""A prefetching iterator: a reader thread runs ahead of the consumer (issue 12).

    with Prefetch(batches(), depth=2) as stream:
        for item in stream:
            ...            # screening runs while the thread reads, decodes and normalises
    stream.wait_s          # seconds the consumer waited for input

The producer is any iterator; its work (Lance reads and decoding release the GIL; torch ops
do too) overlaps the consumer's. The queue is bounded (``depth`` items), so memory stays
flat. An exception in the producer is raised in the consumer at the point it would have
got the next item; leaving the ``with`` block early stops the thread. Pure Python, no IO
of its own: importable without Lance.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetch(Generic[T]):
    """Iterate ``source`` on a background thread, up to ``depth`` items ahead.

    ``wait_s``: seconds the consumer spent blocked waiting for an item (input starvation;
    on a GPU build, time the device had no batch to screen). ``elapsed_s``: seconds from
    the first request to the end of iteration or close. Raises whatever ``source`` raises.
    """

    def __init__(self, source: Iterable[T], depth: int = 2):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ep-prefetch", daemon=True)
        self._started = False
        self._done = False
        self._t0: float | None = None
        self._t1: float | None = None
        self.wait_s = 0.0
        self.items = 0

    # -- producer ----------------------------------------------------------------------------
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        source = iter(self._source)
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, re-raised there
            self._put(_Failure(error))
            return
        finally:
            if hasattr(source, "close"):  # a generator: release its reader on this thread
                source.close()
        self._put(_END)

    # -- consumer ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[T]:
        if not self._started:
            self._started = True
            self._t0 = time.perf_counter()
            self._thread.start()
        while not self._done:
            start = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - start
            if item is _END:
                self._finish()
                return
            if isinstance(item, _Failure):
                self._finish()
                raise item.error
            self.items += 1
            yield item

    @property
    def elapsed_s(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self._t1 or time.perf_counter()) - self._t0

    @property
    def wait_share(self) -> float:
        """Share of the elapsed time the consumer waited on input (0 when nothing ran)."""
        elapsed = self.elapsed_s
        return self.wait_s / elapsed if elapsed > 0 else 0.0

    def _finish(self):
        self._done = True
        if self._t1 is None and self._t0 is not None:
            self._t1 = time.perf_counter()

    def close(self):
        """Stop the reader thread (it may be blocked on a full queue) and wait for it."""
        self._finish()
        self._stop.set()
        if self._started:
            self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc):
        self.close()
