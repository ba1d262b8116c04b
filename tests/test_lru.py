"""lru: the byte-bounded cache shared by worker threads (random outers are made once per key)."""
import threading
import time

import pytest


def test_shared_cache_makes_a_value_once_for_concurrent_askers_and_passes_errors_on():
    from concurrent.futures import ThreadPoolExecutor

    from lora_convert.lru import BytesLRU
    cache, made, gate = BytesLRU(1 << 20, size=lambda v: 8), [], threading.Event()

    def make():
        made.append(1)
        gate.wait(5)
        return object()

    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(cache.get, "k", make) for _ in range(4)]
        time.sleep(0.05)
        gate.set()
        values = [f.result(5) for f in futures]
    assert len(made) == 1 and all(v is values[0] for v in values)

    def fail():
        raise ValueError("boom")
    with pytest.raises(ValueError):
        cache.get("bad", fail)
    assert cache.get("bad", lambda: "ok") == "ok"  # a failure is not cached


def test_shared_cache_recovers_from_a_failed_store_and_allows_reentrant_makes():
    from lora_convert.lru import BytesLRU
    fail = [True]

    def size(v):
        if fail.pop() if fail else False:
            raise MemoryError("while measuring")
        return 8
    cache = BytesLRU(1 << 20, size=size)
    with pytest.raises(MemoryError):
        cache.get("k", lambda: 1)
    done = []
    t = threading.Thread(target=lambda: done.append(cache.get("k", lambda: 2)))
    t.start()
    t.join(5)
    assert done == [2]  # not left waiting for the failed attempt
    assert cache.get("outer", lambda: cache.get("outer", lambda: "inner") + "+outer") == "inner+outer"
