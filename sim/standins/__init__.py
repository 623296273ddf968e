"""Stand-ins for what cannot run in a test container or on a developer's machine, each a small object that
records what it was asked: logind (:mod:`.login1`), systemd's manager and ``boot-complete.target``
(:mod:`.systemd`), update-engine's D-Bus face for locksmithd's tests (:mod:`.update_engine`), and GRUB's gptprio
bootloader (:mod:`.bootloader`).

Rules: a stand-in speaks the real service's names, paths and signatures on a private bus (:mod:`sim.bus`), so the
code under test cannot tell; it does nothing the real one would do to the machine (no reboot, no unit start);
each says in its docstring what it stands in for. Bus-connected stand-ins are async context managers whose exit
disconnects them.
"""
