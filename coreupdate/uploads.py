"""Storing an uploaded payload: one path for the API's ``PUT …/payload`` and the dashboard's upload form.

Rules: the bytes go to a temporary file under ``packages/.incoming`` (``coreos_common.files.NewFile``) while
their size (bounded by the server's limit), SHA-256 and SHA-1 are computed; the payload is then verified as
update-engine would verify it (structure, operation hashes, partition hash and, with the server's public key, the
signature); only a payload that passed is moved to ``packages/APP/VERSION/FILE``, durably (a power cut cannot leave
a recorded package with a torn file), and recorded, and a failed record removes the file again. One upload of
an app's version at a time: a second one, while the first is received, is a Conflict (both would be moved to the
same file, and the one whose record failed would remove the other's).
``require_key``: refuse when the server has no public key (the dashboard never accepts an unsigned payload).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coreos_common.files import NewFile
from coreupdate.model import Package
from coreupdate.storage.store import Conflict
from coreupdate.validation import ValidationError
from update_engine.errors import UpdateEngineError
from update_engine.payload.files import check_payload_file, verify_payload_file
from update_engine.payload.verify import VerifiedPayload

if TYPE_CHECKING:
    from coreupdate.server import Server


@dataclass(frozen=True)
class StoredUpload:
    package: Package
    verified: VerifiedPayload


async def store_upload(server: Server, app_id: str, version: str, file_name: str, chunks: AsyncIterator[bytes],
                       *, require_key: bool = False) -> StoredUpload:
    """Receive, verify, store and record a payload (see the module docstring).  Raises ValidationError or
    Conflict with what is wrong; the catalog is reloaded by the caller."""
    if (app_id, version) in server.catalog.packages:
        raise Conflict(f"application {app_id} already has a package for version {version}")
    if (app_id, version) in server.uploads_in_progress:
        raise Conflict(f"a payload for version {version} of application {app_id} is being uploaded; wait for it")
    server.uploads_in_progress.add((app_id, version))
    try:
        return await _store_upload(server, app_id, version, file_name, chunks, require_key=require_key)
    finally:
        server.uploads_in_progress.discard((app_id, version))


async def _store_upload(server: Server, app_id: str, version: str, file_name: str, chunks: AsyncIterator[bytes],
                        *, require_key: bool) -> StoredUpload:
    config = server.config
    key = config.payload_public_key
    if require_key and key is None:
        raise ValidationError("payload", "cannot be verified: the server has no public key "
                                         "(start it with --payload-public-key)")
    incoming = config.package_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    final = config.package_dir / app_id / version / file_name
    # 0600: only the server reads it (it serves the file itself).
    with NewFile(final, 0o600, directory=incoming) as new:
        sha256, sha1, size = hashlib.sha256(), hashlib.sha1(), 0
        async for chunk in chunks:
            size += len(chunk)
            if size > config.max_payload_bytes:
                raise ValidationError("payload", f"is larger than the server's limit of "
                                                 f"{config.max_payload_bytes} bytes")
            sha256.update(chunk)
            sha1.update(chunk)
            new.write(chunk)
        if size == 0:
            raise ValidationError("payload", "is empty")
        try:
            if key is not None:
                verified = await server.db(verify_payload_file, new.temporary, key)
            else:
                verified = await server.db(check_payload_file, new.temporary)
        except UpdateEngineError as exc:
            raise ValidationError("payload", f"is not a valid signed update payload: {exc}") from None
        package = Package(
            app_id=app_id, version=version, size=size, sha256_b64=base64.b64encode(sha256.digest()).decode(),
            sha1_b64=base64.b64encode(sha1.digest()).decode(), file_name=file_name,
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        await server.db(new.commit, durable=True)  # the fsync of a large payload takes a while: not on the loop
    try:
        created = await server.db(server.store.add_package, package)
    except Exception:
        final.unlink(missing_ok=True)
        raise
    return StoredUpload(created, verified)
