"""st: the safetensors reader (LazyTensors) and the streaming writer (StreamingWriter): header
room, spooling with kernel copies and their fallbacks, short reads, and files that change
under the reader. Each is checked against the reference safetensors reader or the path it
replaces."""
import errno
import os

import pytest
import torch

from lora_convert.errors import BadInputError
from lora_convert.st import LazyTensors, StreamingWriter


def test_spool_copy_falls_back_when_the_kernel_copy_is_refused(tmp_path, monkeypatch):
    def refuse(*_):
        raise OSError(errno.EXDEV, "cross-device")

    t = {"a": torch.arange(10_000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.float16)}
    for attr in ("copy_file_range", "sendfile"):
        monkeypatch.setattr(os, attr, refuse, raising=False)
        with StreamingWriter(tmp_path / f"{attr}.safetensors") as w:
            for k, v in t.items():
                w.add(k, v)
            w.finish({"x": "y"})
        lazy = LazyTensors(tmp_path / f"{attr}.safetensors")
        assert all(torch.equal(lazy.get(k), v) for k, v in t.items()) and lazy.metadata == {"x": "y"}


def test_a_file_that_shrinks_after_its_header_was_read_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    with StreamingWriter(path) as w:
        w.add("a", torch.ones(1000))
        w.finish()
    lazy = LazyTensors(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(BadInputError, match="file ends inside"):
        lazy.get("a")


def test_reads_larger_than_one_read_call_and_without_preadv(tmp_path, monkeypatch):
    """Linux returns at most ~2 GiB per read call: a tensor is read in as many calls as it takes."""
    from lora_convert import st
    from safetensors.torch import save_file
    t = torch.arange(10_000, dtype=torch.float32).reshape(100, 100)
    save_file({"w": t}, tmp_path / "a.safetensors")
    real, calls = os.preadv, []

    def short_preadv(fd, buffers, offset):
        calls.append(offset)
        return real(fd, [buffers[0][:4096]], offset)  # at most 4 KiB per call
    monkeypatch.setattr(st.os, "preadv", short_preadv)
    assert torch.equal(LazyTensors(tmp_path / "a.safetensors").get("w"), t)
    assert len(calls) == 10
    monkeypatch.delattr(st.os, "preadv")  # platforms without it read through a file object
    assert torch.equal(LazyTensors(tmp_path / "a.safetensors").get("w"), t)


@pytest.mark.parametrize("reserve", [0, 8, 4096, 1 << 20])
@pytest.mark.parametrize("refuse_kernel_copy", [False, True])
def test_header_room_writes_data_once_and_falls_back_when_the_header_outgrows_it(tmp_path, monkeypatch, reserve,
                                                                                 refuse_kernel_copy):
    """8 bytes are too few for this header and 1 MiB would pad ~55% of the file (the data
    moves behind a compact header in both cases); 4096 holds it with padding under 3%."""
    from safetensors import safe_open
    if refuse_kernel_copy:
        for attr in ("copy_file_range", "sendfile"):
            monkeypatch.setattr(os, attr, lambda *_: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")), raising=False)
    t = {"a": torch.arange(200_000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.float16)}
    path = tmp_path / "t.safetensors"
    with StreamingWriter(path, reserve=reserve) as w:
        for k, v in t.items():
            w.add(k, v)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors" if reserve else "t.safetensors.spool"]
        w.finish({"x": "y"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0 and (header_len == 4096) == (reserve == 4096)
    assert len(raw[8:8 + header_len]) - len(raw[8:8 + header_len].rstrip(b" ")) <= 0.03 * len(raw)
    lazy = LazyTensors(path)
    assert all(torch.equal(lazy.get(k), v) for k, v in t.items()) and lazy.metadata == {"x": "y"}
    with safe_open(path, framework="pt") as fh:  # the reference reader accepts the padded header
        assert torch.equal(fh.get_tensor("a"), t["a"]) and fh.metadata() == {"x": "y"}


def test_header_room_is_removed_on_abort(tmp_path):
    with pytest.raises(RuntimeError):
        with StreamingWriter(tmp_path / "t.safetensors", reserve=1024) as w:
            w.add("a", torch.ones(4))
            raise RuntimeError("interrupted")
    assert not list(tmp_path.iterdir())


def test_peek_does_not_keep_the_first_item_alive():
    import weakref

    from lora_convert.st import peek

    class Item:
        pass
    refs = []

    def items():
        for _ in range(3):
            item = Item()
            refs.append(weakref.ref(item))
            yield item
    first, again = peek(items())
    del first
    alive = [[r() is not None for r in refs] for _ in again]
    assert alive[1][0] is False and alive[2][:2] == [False, False]
    assert peek(iter([]))[0] is None and list(peek(iter([]))[1]) == []
