"""The shared metrics module: text format read back by prometheus_client's parser, the socket, the textfile."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coreos_common.metrics import (
    MetricsError,
    MetricsExporter,
    MetricsSocket,
    Registry,
    TextfileWriter,
    format_value,
)


def parsed(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by family name, keyed by their sorted labels, as Prometheus itself reads them."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def sample_registry() -> Registry:
    registry = Registry()
    status = registry.gauge("demo_status", "Current status, one-hot.", ("status",))
    status.set_one_hot("status", ["IDLE", "DOWNLOADING"], "DOWNLOADING")
    errors = registry.counter("demo_errors_total", "Errors by code.", ("code",))
    errors.inc(code="9")
    errors.inc(2, code="9")
    registry.gauge("demo_bytes", "Bytes.").set(1234567)
    return registry


def test_prometheus_reads_back_every_sample() -> None:
    samples = parsed(sample_registry().render())
    assert samples["demo_status"] == {(("status", "DOWNLOADING"),): 1.0, (("status", "IDLE"),): 0.0}
    assert samples["demo_errors_total"] == {(("code", "9"),): 3.0}
    assert samples["demo_bytes"] == {(): 1234567.0}


def test_hostile_label_values_and_help_cannot_break_the_format() -> None:
    registry = Registry()
    family = registry.gauge("demo_version", 'Help with \\ and\nnewline and "quotes".', ("version",))
    hostile = 'v1"} 999\nfake_metric 1\\'
    family.set(1, version=hostile)
    text = registry.render()
    samples = parsed(text)
    assert samples == {"demo_version": {(("version", hostile),): 1.0}}
    assert "fake_metric" not in {line.split(" ")[0] for line in text.splitlines()}


@pytest.mark.parametrize(("value", "text"), [
    (3.0, "3"), (0.5, "0.5"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"),
    (1e20, "1e+20"), (-2.0, "-2"),
])
def test_values_are_written_as_the_format_expects(value: float, text: str) -> None:
    assert format_value(value) == text
    if not math.isnan(value):
        assert float(text.replace("+Inf", "inf").replace("-Inf", "-inf")) == value


def test_declarations_are_checked() -> None:
    registry = Registry()
    registry.gauge("a", "x")
    with pytest.raises(ValueError, match="twice"):
        registry.gauge("a", "x")
    with pytest.raises(ValueError, match="_total"):
        registry.counter("b", "x")
    with pytest.raises(ValueError, match="invalid"):
        registry.gauge("c-d", "x")
    counter = registry.counter("c_total", "x", ("code",))
    with pytest.raises(ValueError, match="labels"):
        counter.inc(other="1")
    with pytest.raises(ValueError, match="decrease"):
        counter.inc(-1, code="1")
    with pytest.raises(TypeError):
        counter.set(1, code="1")


def test_a_failing_collector_costs_only_its_own_values() -> None:
    registry = sample_registry()

    def broken() -> None:
        raise RuntimeError("boom")

    registry.add_collector(broken)
    assert "demo_bytes 1234567" in registry.render()


async def scrape(path: Path) -> str:
    reader, writer = await asyncio.open_unix_connection(str(path))
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data.decode()


async def test_socket_serves_one_scrape_per_connection(tmp_path: Path) -> None:
    registry = sample_registry()
    path = tmp_path / "run" / "metrics.promsock"
    server = MetricsSocket(path, registry.render)
    await server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        first = parsed(await scrape(path))
        registry.families()[2].set(7)
        second = parsed(await scrape(path))
        assert first["demo_bytes"][()] == 1234567 and second["demo_bytes"][()] == 7
    finally:
        await server.close()
    assert not path.exists()


async def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "metrics.promsock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    server = MetricsSocket(path, sample_registry().render)
    await server.start()
    try:
        assert "demo_bytes" in await scrape(path)
    finally:
        await server.close()


async def test_a_socket_in_use_or_a_file_in_the_way_is_refused_by_name(tmp_path: Path) -> None:
    busy = tmp_path / "busy.promsock"
    first = MetricsSocket(busy, sample_registry().render)
    await first.start()
    try:
        with pytest.raises(MetricsError, match=f"{busy} is in use by another process"):
            await MetricsSocket(busy, sample_registry().render).start()
        assert "demo_bytes" in await scrape(busy)  # the first server was not disturbed
    finally:
        await first.close()
    regular = tmp_path / "file.promsock"
    regular.write_text("precious")
    with pytest.raises(MetricsError, match=f"{regular} exists and is not a socket"):
        await MetricsSocket(regular, sample_registry().render).start()
    assert regular.read_text() == "precious"


async def test_exporter_carries_on_without_an_output_it_cannot_open(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    in_the_way = tmp_path / "metrics.promsock"
    in_the_way.mkdir()
    textfile = tmp_path / "node.prom"
    exporter = MetricsExporter(sample_registry(), socket_path=in_the_way, textfile=textfile,
                               textfile_interval=0.01)
    await exporter.start()
    try:
        assert "is not a socket" in caplog.text
        assert parsed(textfile.read_text())["demo_bytes"][()] == 1234567
    finally:
        await exporter.close()


async def test_textfile_rewrites_are_atomic_and_coalesced(tmp_path: Path) -> None:
    registry = sample_registry()
    gauge = registry.families()[2]
    textfile = tmp_path / "node.prom"
    exporter = MetricsExporter(registry, socket_path=None, textfile=textfile, textfile_interval=0.05)
    await exporter.start()
    first_inode = textfile.stat().st_ino
    for value in range(100):
        gauge.set(value)
        exporter.changed()
    await exporter.close()
    assert parsed(textfile.read_text())["demo_bytes"][()] == 99
    assert textfile.stat().st_ino != first_inode  # replaced by rename, never rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["node.prom"]


def test_textfile_names_the_path_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match=r"must end in \.prom"):
        TextfileWriter(tmp_path / "metrics.txt")
    missing_dir = tmp_path / "missing" / "node.prom"
    with pytest.raises(MetricsError, match=str(missing_dir)):
        TextfileWriter(missing_dir).write("x 1\n")
    assert not os.path.exists(missing_dir.parent)
