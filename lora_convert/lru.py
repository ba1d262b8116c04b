"""A small thread-safe LRU cache bounded by bytes, for matrices shared across modules."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable


class BytesLRU:
    """At most `max_bytes` of values (as measured by `size`); least recently used go first.

    A value larger than the whole budget is computed and returned but not kept, so the
    cache never holds more than `max_bytes` however large the adapter's matrices are.
    """

    def __init__(self, max_bytes: int, size: Callable[[object], int]):
        self.max_bytes, self._size = max_bytes, size
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], object]):
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        value = make()  # outside the lock: two threads may compute the same value once each
        n = self._size(value)
        if n <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = (value, n)
                    self._used += n
                while self._used > self.max_bytes:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._used -= dropped
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0
