"""shmserve: inference sidecar served over POSIX shared memory, Unix sockets or HTTP."""

__version__ = "0.1.0"
