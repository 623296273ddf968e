"""When the journal hears about a download: every tenth of it or every 30 s, with rate and time left."""

from __future__ import annotations

from update_engine.engine.progress import DownloadMeter, format_bytes, format_seconds

MIB = 1 << 20


def test_a_line_every_tenth_never_two_for_one_tenth() -> None:
    meter = DownloadMeter(100 * MIB, started=0.0)
    assert meter.feed(5 * MIB, 1.0) is None
    assert meter.feed(10 * MIB, 2.0) == "Downloaded 10% (10.0 MiB of 100.0 MiB) at 5.0 MiB/s, about 18s left"
    assert meter.feed(12 * MIB, 2.5) is None
    # A chunk that crosses several tenths gives one line.
    assert meter.feed(45 * MIB, 9.0) == "Downloaded 45% (45.0 MiB of 100.0 MiB) at 5.0 MiB/s, about 11s left"
    assert meter.feed(49 * MIB, 9.5) is None
    assert meter.feed(50 * MIB, 10.0) is not None


def test_a_slow_download_still_gets_a_line_every_30_s() -> None:
    meter = DownloadMeter(1024 * MIB, started=100.0)
    assert meter.feed(1 * MIB, 129.0) is None
    assert meter.feed(1 * MIB, 130.0) == "Downloaded 0% (1.0 MiB of 1.00 GiB) at 34.1 KiB/s, about 8h32m0s left"
    assert meter.feed(2 * MIB, 140.0) is None
    assert meter.feed(2 * MIB, 160.0) is not None


def test_the_end_is_summed_up_not_announced_as_progress() -> None:
    meter = DownloadMeter(3 * MIB, started=0.0)
    assert meter.feed(3 * MIB, 1.5) is None
    assert meter.summary(3 * MIB, 1.5) == "3.0 MiB in 1.5s (2.0 MiB/s)"


def test_sizes_and_durations_for_people() -> None:
    assert [format_bytes(n) for n in (812, 3500, 12 * MIB, 1.25 * 1024 * MIB)] == [
        "812 B", "3.4 KiB", "12.0 MiB", "1.25 GiB",
    ]
    assert [format_seconds(s) for s in (0.04, 4.2, 187.4, 3 * 3600)] == ["0s", "4.2s", "3m7s", "3h0m0s"]
