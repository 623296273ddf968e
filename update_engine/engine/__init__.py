"""update-engine's engine: the attempt state machine and everything that drives it, without D-Bus.

Modules, each with its rules at its top:

* ``machine`` — the published state (status, progress, new version and size, last check, last attempt) and the
  transition table; pure.
* ``history`` — what is remembered across checks, restarts and boots (the prefs and the reboot marker); the only
  place that names pref keys.
* ``policy`` — pure decisions: may this offer be installed now, what does the check report about the last install.
* ``check`` — one object per update check, its phases explicit; owns the payload sink and the disarmed partition
  until it ends.
* ``attempter`` — the facade the D-Bus adapter and ``update_engine --once`` use.
* ``progress`` — when the journal hears about a download (every 10 % or 30 s), pure.
* ``options``, ``disk``, ``errors`` — paths and limits, the boot disk, the engine's refusals.

Nothing here imports ``update_engine.dbus_service``: the adapter drives the engine, not the other way round.
"""
