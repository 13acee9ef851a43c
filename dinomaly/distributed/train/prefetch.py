"""A background thread that runs an iterator ahead of its consumer (the next batches while this step trains).

It is what lets the next epoch's reads start before the current one ends: the thread never stops at an
epoch boundary, the training loop only takes what is ready.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

PUT_POLL_S = 0.2  # how often a blocked prefetch thread checks whether its consumer left


class prefetched:  # noqa: N801 - used like a generator function
    """`items` produced by a background thread, started at once and running up to `depth` items ahead of
    the consumer; an error there is raised here. close() (or dropping this object) stops the thread, which
    closes `items`, within PUT_POLL_S."""

    _END = object()

    def __init__(self, items: Iterator, depth: int):
        self.items, self.ready, self.stop = items, queue.Queue(maxsize=max(1, depth)), threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._produce, name="dinomaly-prefetch", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        try:
            for item in self.items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, who raises it
            self._put((self._END, err))
        finally:
            if hasattr(self.items, "close"):
                self.items.close()  # in this thread: ends a Ray iteration where it runs

    def _put(self, entry: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(entry, timeout=PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> prefetched:
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        item, err = self.ready.get()
        if item is self._END:
            self.close()
            if err is not None:
                raise err
            raise StopIteration
        return item

    def close(self) -> None:
        self.done = True
        self.stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10 * PUT_POLL_S)

    def __del__(self) -> None:
        self.stop.set()
