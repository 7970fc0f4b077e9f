"""Threaded file work: ordered prefetching and background writing."""
import threading

import pytest

from densevit.runtime.threads import BackgroundWriter, prefetch_map


def test_prefetch_map_keeps_order_and_runs_ahead_concurrently():
    barrier = threading.Barrier(3, timeout=10)

    def fn(i):
        if i < 3:          # the first three calls only return once all three run at the same time
            barrier.wait()
        return i * i

    assert list(prefetch_map(fn, range(10), ahead=4, workers=3)) == [i * i for i in range(10)]


def test_prefetch_map_raises_at_the_failing_item_and_inline_mode():
    def fn(i):
        if i == 2:
            raise ValueError("bad item")
        return i

    it = prefetch_map(fn, range(5), ahead=3, workers=2)
    assert next(it) == 0 and next(it) == 1
    with pytest.raises(ValueError, match="bad item"):
        next(it)
    caller = threading.get_ident()
    assert list(prefetch_map(lambda i: threading.get_ident(), range(3), ahead=0)) == [caller] * 3


def test_prefetch_map_closed_early_stops_submitting():
    calls = []
    lock = threading.Lock()

    def fn(i):
        with lock:
            calls.append(i)
        return i

    it = prefetch_map(fn, range(1000), ahead=4, workers=1)
    assert next(it) == 0
    it.close()
    assert len(calls) <= 6


def test_background_writer_writes_everything_and_reports_failures(tmp_path):
    def write(path, text):
        path.write_text(text)

    with BackgroundWriter(workers=2, max_pending=3) as w:
        for i in range(20):
            w.submit(write, tmp_path / f"{i}.txt", str(i))
    assert sorted(int(p.read_text()) for p in tmp_path.glob("*.txt")) == list(range(20))

    w = BackgroundWriter(workers=1)
    w.submit(write, tmp_path / "missing" / "x.txt", "x")        # parent folder does not exist
    with pytest.raises(FileNotFoundError):
        w.close()

    with pytest.raises(KeyError):                                # the caller's error is not masked
        with BackgroundWriter(workers=1) as w:
            w.submit(write, tmp_path / "missing" / "y.txt", "y")
            raise KeyError("caller")
