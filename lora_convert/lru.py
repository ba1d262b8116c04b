"""A small thread-safe LRU cache bounded by bytes, for matrices shared across modules."""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Hashable


class BytesLRU:
    """At most `max_bytes` of values (as measured by `size`); least recently used go first.

    A value larger than the whole budget is computed and returned but not kept, so the
    cache never holds more than `max_bytes` however large the adapter's matrices are.
    """

    def __init__(self, max_bytes: int, size: Callable[[object], int]):
        self.max_bytes, self._size = max_bytes, size
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], object]):
        """The cached value for `key`, else make() once: threads asking for a key that another
        thread is making wait for that result instead of making it again (compress's workers
        all start by asking for the same few outers). A failed make() is not cached; waiting
        threads get its exception."""
        me = threading.get_ident()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = Future()
                pending.maker = me
        if not owner:
            if pending.maker == me:  # make() asked for its own key: waiting would never end
                return make()
            return pending.result()
        try:
            value = make()
            self._store(key, value)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(value)
        finally:
            with self._lock:
                del self._pending[key]
        return value

    def _store(self, key: Hashable, value: object) -> None:
        n = self._size(value)
        if n > self.max_bytes:
            return
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, n)
                self._used += n
            while self._used > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._used -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0
