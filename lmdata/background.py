"""A generator's items produced by a thread ahead of their consumer."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from queue import Full, Queue
from typing import TypeVar

T = TypeVar("T")


def in_background(items: Iterator[T], depth: int = 1) -> Generator[T, None, None]:
    """``items``, produced by a thread up to ``depth`` ahead: reading, decompressing and decoding overlap with
    tokenizing (both tokenizer libraries release the GIL while they encode). An exception in the thread is
    raised here; closing the generator stops the thread."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        """Hand ``entry`` over, unless the consumer stopped (it then never takes one again)."""
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer, which raises it with its traceback
            put((done, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator: close it here, in the thread that runs it (its files too)
                close()

    thread = threading.Thread(target=produce, name="prepare-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
