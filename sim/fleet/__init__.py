"""A simulated fleet on one machine, updated by the real daemons: nodes, the lock service, the Omaha side.

The pieces, one module each: :mod:`.node` (one machine: a GPT disk, a private system bus with the logind and systemd
stand-ins, the real ``update_engine`` and ``locksmithd``, the gptprio bootloader on every boot), :mod:`.daemons`
(a node's two daemon processes), :mod:`.omaha` (the pluggable Omaha side the nodes update from, and the dev server
behind a slow link), :mod:`.coreupdate` (the update server ``coreupdate`` there, with its view of each instance),
:mod:`.semaphore` (the etcd reboot semaphore followed revision by revision),
:mod:`.events` (what the fleet reports as it runs) and :mod:`.fleet` (the composition, its invariants and its
shutdown).

Rules: the fleet reports, it does not print: every happening is a :mod:`.events` value handed to one observer, after
the fleet's own records are up to date. What a node must end as is the caller's business (the demo's scenarios);
the fleet checks only what no run may break (never more than ``max`` nodes down, never more than ``max`` holders in
any revision of the semaphore). Everything it starts is stopped by :meth:`.fleet.Fleet.shutdown`, each step even
when an earlier one failed.
"""
