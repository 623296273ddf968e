"""What update-engine, locksmithd and the update server share and none of them owns.

Rules: one concept per module; every rule that more than one program needs (the D-Bus contract of
``com.coreos.update1``, update.conf lookup, identities, D-Bus calls, systemd notify, backoff, Go durations,
booleans, log lines, reboot windows) lives here exactly once.  Nothing in this package imports
``update_engine``, ``locksmithd`` or ``coreupdate``; the pure modules open no files, sockets or clocks.
"""
