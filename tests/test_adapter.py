"""adapter: ordered_map, the bounded worker pool that compress and save stream modules through."""
import threading
import time

import pytest

from lora_convert.adapter import ordered_map


def test_ordered_map_keeps_order_bounds_work_in_flight_and_raises_in_turn():
    live, peak, lock = [0], [0], threading.Lock()

    class Result:
        def __init__(self, i):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            self.i = i

        def release(self):
            with lock:
                live[0] -= 1

    def work(i):
        time.sleep(0.002 * (i % 3))
        if i == 7:
            raise ValueError("item 7")
        return Result(i)

    seen = []
    with pytest.raises(ValueError, match="item 7"):
        for r in ordered_map(work, range(20), workers=3):
            seen.append(r.i)
            r.release()
    assert seen == list(range(7))
    assert peak[0] <= 3 + 1  # one per worker, and the one the caller holds
