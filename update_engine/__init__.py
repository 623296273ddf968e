"""update-engine: Omaha update checks, signed CrAU payloads, A/B USR partitions and GPT boot flags."""

__version__ = "0.1.0"

# The version string sent to Omaha servers; servers and dashboards key on it, so it stays the original's.
OMAHA_UPDATER_VERSION = "update_engine-0.4.10"
