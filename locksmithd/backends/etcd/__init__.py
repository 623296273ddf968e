"""The reboot semaphore in etcd: one protocol, written once without I/O, and two thin shells.

Modules, each stating its rules at its top:

* ``gateway`` — etcd's v3 JSON gateway as values: calls and answers, endpoint failover, authentication, the
  watch stream's messages; and *procedures*, generators that yield the HTTP calls they need.
* ``ops`` — the semaphore's operations as procedures: read, create-and-read, compare-and-swap with the
  holders' records, the waiting line's lease and keys.
* ``v2`` — the same semaphore in etcd's v2 key space, in locksmith's exact format, for fleets that still run
  locksmith (compatibility mode).
* ``waiter`` — the wait for a slot as a state machine (phases with their data, actions, events).
* ``client`` — the asyncio shell (procedures over ``coreos_common.http_async``, watches, the lease keeper);
  ``backend`` — the LockBackend that drives the waiter with it (locksmithd).
* ``sync`` — the blocking shell (``coreos_common.http_sync``), for locksmithctl, which must start fast.

This package's ``__init__`` imports nothing, so a command that only needs the blocking shell never loads
asyncio.
"""
