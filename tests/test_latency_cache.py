"""The user cache of latency tables: keyed by device fingerprint (runtime versions included), engine
and threads; reused without measuring, extended with only the missing shapes, and a hostile cache
file (garbage, a link, a FIFO, another device's table under this key) is ignored and measured again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence

import pytest

from compressor.prune.latency import LocalLatency
from compressor.prune.latency_cache import CachedLatency, LatencyCache, cache_dir
from edge_runtime.layer_timing import LatencyTable, LayerShape, device_fingerprint, macs

SHAPES = [LayerShape("conv", a, b, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1) for a in (8, 16) for b in (8, 16)]


class CountingSource:
    """A source that records what it was asked to measure (the count is asserted, never a time)."""

    def __init__(self, device: str = "") -> None:
        self.inner, self.asked, self.device = LocalLatency(rounds=1, runs=2), [], device or device_fingerprint()

    def describe(self) -> str:
        return "counting"

    def table(self, shapes: Sequence[LayerShape], engine: str, threads: int) -> LatencyTable:
        self.asked.append(sorted(s.key() for s in shapes))
        # times that follow the MACs (a real measurement of such tiny layers may be noise on a busy machine)
        return LatencyTable({s.key(): 1e-5 * macs(s) for s in shapes}, threads, "test", engine, 0.01, 0.001,
                            self.device)

    def time_networks(self, models: Sequence[bytes], threads: int) -> List[float]:
        return self.inner.time_networks(models, threads)


def _cached(tmp_path: Path, device: str = "") -> CachedLatency:
    fingerprint = (lambda: device) if device else device_fingerprint
    return CachedLatency(CountingSource(device), fingerprint, LatencyCache(tmp_path / "cache"))


def test_the_same_device_engine_and_threads_reuse_the_table_without_measuring(tmp_path: Path) -> None:
    first = _cached(tmp_path)
    table = first.table(SHAPES, "ort", 1)
    again = _cached(tmp_path)
    assert again.table(SHAPES[:2], "ort", 1).ms == {s.key(): table.ms[s.key()] for s in SHAPES[:2]}
    assert again.table(SHAPES, "ort", 1) == table
    assert first.source.asked == [sorted(s.key() for s in SHAPES)] and again.source.asked == []
    assert again.measured == []


@pytest.mark.parametrize("change", ["device", "engine", "threads"])
def test_another_device_engine_or_thread_count_is_measured_again(tmp_path: Path, change: str) -> None:
    _cached(tmp_path, "pi-a").table(SHAPES, "ort", 1)
    other = _cached(tmp_path, "pi-b" if change == "device" else "pi-a")
    table = other.table(SHAPES, "ort-int8" if change == "engine" else "ort", 2 if change == "threads" else 1)
    assert len(other.source.asked) == 1 and len(other.source.asked[0]) == len(SHAPES)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # both entries kept
    assert (table.device, table.engine, table.threads) == (
        "pi-b" if change == "device" else "pi-a", "ort-int8" if change == "engine" else "ort",
        2 if change == "threads" else 1)


def test_new_shapes_extend_the_entry_and_only_they_are_measured(tmp_path: Path) -> None:
    _cached(tmp_path).table(SHAPES[:2], "ort", 1)
    later = _cached(tmp_path)
    table = later.table(SHAPES, "ort", 1)
    assert later.source.asked == [sorted(s.key() for s in SHAPES[2:])] and set(table.ms) == {s.key() for s in SHAPES}
    third = _cached(tmp_path)
    third.table(SHAPES, "ort", 1)
    assert third.source.asked == []


@pytest.mark.parametrize("plant", ["garbage", "symlink", "fifo", "other-device", "huge"])
def test_a_hostile_cache_file_is_ignored_measured_again_and_never_written_through(
        tmp_path: Path, plant: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = LatencyCache(tmp_path / "cache")
    path = cache.path("pi-a", "ort", 1)
    path.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    if plant == "garbage":
        path.write_bytes(b"\x00{not json")
    elif plant == "symlink":
        path.symlink_to(victim)
    elif plant == "fifo":
        os.mkfifo(path)
    elif plant == "huge":
        with open(path, "wb") as handle:
            handle.truncate(64 << 20)
    else:
        _cached(tmp_path / "elsewhere", "pi-z").table(SHAPES, "ort", 1)
        (tmp_path / "elsewhere" / "cache" / os.listdir(tmp_path / "elsewhere" / "cache")[0]).rename(path)
    source = _cached(tmp_path, "pi-a")
    with caplog.at_level("WARNING", logger="compressor"):
        table = source.table(SHAPES, "ort", 1)
    assert len(source.source.asked) == 1 and table.device == "pi-a"
    assert any("measuring again" in r.getMessage() for r in caplog.records)
    assert victim.read_text() == "keep me"
    assert not path.is_symlink() and path.is_file()
    assert cache.load("pi-a", "ort", 1) == source.table(SHAPES, "ort", 1)  # and reused from now on
    assert len(source.source.asked) == 1


def test_the_cache_lives_under_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "edgeprune" / "latency"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "edgeprune" / "latency"
