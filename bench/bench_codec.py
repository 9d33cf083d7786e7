"""Codec micro-benchmarks: the Cython frame codec against its pure-Python twin.

Run from the repository root (not part of the test run, which only collects ``tests/``)::

    python -m pytest bench/bench_codec.py

pytest-benchmark prints its timing table; at the end a summary table of frames/s and MB/s
(payload bytes) per case follows, ready for bench/README.md. ``-k cython`` or ``-k python``
narrows to one codec; ``--benchmark-json=out.json`` keeps the raw figures.
"""

from __future__ import annotations

import importlib

import pytest

KiB = 1024
SIZES = [64, 16 * KiB, 256 * KiB]
MAX_FRAME = 256 * KiB
READ_SIZE = 64 * KiB  # a typical socket read: 256 KiB frames arrive in pieces
MASK_SIZES = [64, 16 * KiB, 256 * KiB]
KEY = b"\x37\xfa\x21\x3d"

_results: list[tuple[str, str, str, float, float | None]] = []


def _codec(kind: str):
    try:
        return importlib.import_module("tunnel._frames" if kind == "cython" else "tunnel.codec.pure")
    except ImportError:
        pytest.skip("tunnel._frames is not built (pip install -e . or python setup.py build_ext --inplace)")


@pytest.fixture(params=["cython", "python"])
def codec(request):
    return _codec(request.param)


class _Summary:
    """Prints the frames/s and MB/s table in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter):
        if not _results:
            return
        terminalreporter.write_sep("-", "codec summary (best round)")
        terminalreporter.write_line("| case | payload | codec | ops/s | MB/s |")
        terminalreporter.write_line("|------|--------:|-------|------:|-----:|")
        for case, size, impl, ops, mbps in _results:
            rate = "" if mbps is None else f"{mbps:,.0f}"
            terminalreporter.write_line(f"| {case} | {size} | {impl} | {ops:,.0f} | {rate} |")


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("bench-codec-summary"):
        manager.register(_Summary(), "bench-codec-summary")
    yield


def _label(size: int) -> str:
    return f"{size // KiB} KiB" if size >= KiB else f"{size} B"


def _record(benchmark, case: str, size: int, impl: str, ops_per_call: int, bytes_per_call: int | None):
    """Store ops/s and MB/s (10^6 payload bytes per second) from the best round: on a shared,
    loaded machine the minimum is the figure that reflects the code rather than the neighbours."""
    best = benchmark.stats.stats.min
    ops = ops_per_call / best
    mbps = None if bytes_per_call is None else bytes_per_call / best / 1e6
    benchmark.extra_info.update({"ops_per_s": ops, "mb_per_s": mbps})
    _results.append((case, _label(size), impl, ops, mbps))


def _stream(codec, size: int, total: int) -> tuple[bytes, int]:
    """About ``total`` bytes of DATA frames with ``size``-byte payloads (at least 8 frames)."""
    count = max(8, total // (size + 12))
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = codec.encode_header(0, 0, 1, size) + payload
    return frame * count, count


@pytest.mark.parametrize("size", SIZES, ids=_label)
def test_encode_frame(benchmark, codec, size):
    """A whole frame as one bytes object (header + payload copy)."""
    payload = bytes(size)
    benchmark(codec.encode_frame, 0, 1, 7, payload)
    _record(benchmark, "encode_frame", size, codec.IMPLEMENTATION, 1, size)


@pytest.mark.parametrize("size", SIZES, ids=_label)
def test_encode_header(benchmark, codec, size):
    """The DATA path: a 12-byte header, the payload is written after it uncopied."""
    benchmark(codec.encode_header, 0, 1, 7, size)
    _record(benchmark, "encode_header", size, codec.IMPLEMENTATION, 1, None)


@pytest.mark.parametrize("size", SIZES, ids=_label)
def test_decode_whole(benchmark, codec, size):
    """Decode one 64 KiB buffer of frames (at least 8) fed at once: zero-copy views."""
    wire, count = _stream(codec, size, READ_SIZE)

    def run():
        return codec.FrameDecoder(MAX_FRAME).feed(wire)

    frames = benchmark(run)
    assert len(frames) == count
    _record(benchmark, "decode (one 64 KiB buffer)", size, codec.IMPLEMENTATION, count, count * size)


@pytest.mark.parametrize("size", SIZES, ids=_label)
def test_decode_reads(benchmark, codec, size):
    """Decode ~1 MiB of frames fed in 64 KiB reads, as they come off a socket (256 KiB
    frames arrive in PARTIAL pieces)."""
    wire, count = _stream(codec, size, 1024 * KiB)
    chunks = [wire[i:i + READ_SIZE] for i in range(0, len(wire), READ_SIZE)]

    def run():
        decoder = codec.FrameDecoder(MAX_FRAME)
        n = 0
        for chunk in chunks:
            n += len(decoder.feed(chunk))
        return n

    assert benchmark(run) >= count
    _record(benchmark, "decode (64 KiB reads)", size, codec.IMPLEMENTATION, count, count * size)


@pytest.mark.parametrize("size", MASK_SIZES, ids=_label)
def test_ws_mask(benchmark, codec, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    out = benchmark(codec.ws_mask, data, KEY, 1)
    assert len(out) == size
    _record(benchmark, "ws_mask", size, codec.IMPLEMENTATION, 1, size)


@pytest.mark.parametrize("size", MASK_SIZES, ids=_label)
def test_ws_mask_join(benchmark, codec, size):
    """A masked client message from a header-sized piece and the payload (the WSS send path)."""
    parts = [codec.encode_header(0, 0, 1, size), bytes(size)]
    out = benchmark(codec.ws_mask_join, parts, KEY)
    assert len(out) == size + 12
    _record(benchmark, "ws_mask_join", size, codec.IMPLEMENTATION, 1, size + 12)
