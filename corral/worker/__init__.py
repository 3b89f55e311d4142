"""The agent side of the wire protocol: WorkerCore and the worker process."""

from corral.worker.core import EXIT_MEMORY, EXIT_OK, WorkerCore

__all__ = ["EXIT_MEMORY", "EXIT_OK", "WorkerCore"]
