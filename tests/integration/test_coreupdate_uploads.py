"""Uploads of payloads to coreupdate, in process on SQLite: two uploads of one version at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from coreupdate import COREOS_APP_ID
from coreupdate.server import Server, ServerConfig
from coreupdate.storage import engine as db_engine
from coreupdate.storage.store import Conflict, Store
from coreupdate.uploads import store_upload
from sim.payload import build_release, key_files


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    """The payload as a slow client sends it: a piece, then the other upload's turn."""
    for start in range(0, len(data), 65536):
        yield data[start : start + 65536]
        await asyncio.sleep(0)


async def test_a_second_upload_of_the_same_version_is_refused_and_leaves_the_first_ones_file(tmp_path: Path) -> None:
    payload = build_release(tmp_path / "release", key_files(tmp_path / "keys"), seed=5).payload.read_bytes()
    engine = db_engine.create(db_engine.sqlite_url(tmp_path))
    store = Store(engine)
    store.migrate()
    server = Server(ServerConfig(data_dir=tmp_path / "data"), store)
    try:
        results = await asyncio.gather(
            store_upload(server, COREOS_APP_ID, "2.0.0", "update.gz", _pieces(payload)),
            store_upload(server, COREOS_APP_ID, "2.0.0", "update.gz", _pieces(payload)),
            return_exceptions=True,
        )
    finally:
        server.executor.shutdown()
        engine.dispose()
    stored = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(stored) == 1 and len(refused) == 1, results
    assert isinstance(refused[0], Conflict)
    recorded = tmp_path / "data" / "packages" / COREOS_APP_ID / "2.0.0" / "update.gz"
    assert recorded.read_bytes() == payload, "the recorded package's file was removed or replaced"
