"""coreupdate: the fleet's own Omaha update server (groups, channels, rate-limited rollouts, API, CLI).

Layout: pure cores (``model``, ``instance_status``, ``policy``, ``validation``) decide; ``storage`` keeps the
state in SQLite or PostgreSQL; ``server`` (aiohttp) is the shell that feeds the cores with requests and clocks.
"""

__version__ = "0.1.0"

# The CoreOS/Flatcar application, created in every new database.
COREOS_APP_ID = "e96281a6-d1af-4bde-9a0a-97b76e56dc57"
# Channels and groups of that application in every new database (groups answer to these names as tracks).
DEFAULT_CHANNELS = ("stable", "beta", "alpha")
