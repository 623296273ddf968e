"""locksmithd: reboot coordination for update-engine nodes (etcd semaphore, FleetLock, reboot windows)."""

__version__ = "0.1.0"
