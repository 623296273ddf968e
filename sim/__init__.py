"""The simulation harness: the real components and the stand-ins a node, a fleet or a hostile network is made of.

Used by the tests (through pytest fixtures in ``tests/fixtures/``), the demo (``demo/``) and the benchmarks
(``bench/``). It is a development harness, not part of the product: the Debian package does not install it and
``setup.cfg`` does not list it. It runs from a checkout of the repository, with the project installed in the
``.venv`` beside it.

Rules every module here keeps:

* **No pytest.** Nothing in ``sim`` imports pytest (a unit test checks it), so the demo and the benchmarks run
  without it. Problems are exceptions with a message naming what is missing or wrong: a missing tool raises
  :class:`sim.tools.MissingTool`; turning that into a test failure is the fixtures' job.
* **One concept per module**, each opening with its rules: ``tools`` (repository and tool paths), ``ports``
  (loopback ports), ``bus`` (private ``dbus-daemon``), ``etcd`` (members and clusters), ``tls`` (a throw-away
  CA), ``postgres`` (a private PostgreSQL server), ``disks`` (GPT images by sgdisk, cgpt checks), ``node`` (a
  node's file system root), ``payload`` (key pairs, releases, hand-built payloads), ``devserver`` and
  ``coreupdate`` (the product's two Omaha servers as processes), ``omaha`` (the Omaha stub with hooks for hostile
  behaviour), ``link`` (a slow network link), ``standins/`` (logind, systemd, update-engine, the GRUB gptprio
  bootloader), ``fleet/`` (a simulated fleet of nodes running the real daemons, with etcd and a pluggable Omaha
  side).
* **What sim starts, sim stops.** Every process or server it starts is a context manager (``with`` or
  ``async with``) whose exit stops it, also after an error, and every wait is bounded.
* **Loopback only.** Servers listen on 127.0.0.1 on free ports, never fixed ones.
"""
