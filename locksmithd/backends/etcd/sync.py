"""The blocking shell of the etcd protocol, for locksmithctl: the same procedures as the daemon, no event loop.

Rules of this file: it decides nothing; ``run`` carries a procedure's calls over ``coreos_common.http_sync``
and returns its result. It imports neither asyncio nor (for http endpoints) ssl, so ``locksmithctl status``
starts in tens of milliseconds.
"""

from __future__ import annotations

from typing import TypeVar

from coreos_common.http1 import HttpError
from coreos_common.http_sync import SyncHttpClient
from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd.gateway import Answer, GatewaySession, HttpCall, Procedure, answer_of, failure_of
from locksmithd.backends.etcd.ops import SemaphoreKeys
from locksmithd.backends.etcd_settings import EtcdSettings

T = TypeVar("T")


class SyncEtcdClient:
    """One command's connection to etcd."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.session = GatewaySession(settings)
        self.settings = settings
        self.keys = SemaphoreKeys.for_group(settings.group)
        self._http = SyncHttpClient(ssl_context=self._tls, user_agent="locksmithctl")

    def _tls(self):  # type: ignore[no-untyped-def]
        from coreos_common.tls import TlsFiles, TlsSettingsError, client_context

        files = TlsFiles(self.settings.ca_file, self.settings.cert_file, self.settings.key_file)
        try:
            return client_context(files)
        except TlsSettingsError as exc:
            raise LockBackendError(f"etcd TLS settings: {exc}") from None

    def _answer(self, call: HttpCall) -> Answer:
        try:
            response = self._http.request(
                call.method, call.endpoint + call.path, headers=call.headers, body=call.body,
                timeout=call.timeout, max_body=call.max_answer,
            )  # fmt: skip
        except HttpError as exc:
            return failure_of(exc, call)
        return answer_of(response)

    def run(self, procedure: Procedure[T]) -> T:
        """Carry ``procedure``'s calls to etcd; its result."""
        try:
            call = next(procedure)
            while True:
                call = procedure.send(self._answer(call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def close(self) -> None:
        self._http.close()
