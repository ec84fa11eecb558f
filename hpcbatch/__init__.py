"""hpcbatch: a self-hosted batch service for HPC clusters you own.

The public names are imported on first use, so ``import hpcbatch.kernels`` on
every MPI rank does not pay for the coordinator, store and CLI.
"""

from hpcbatch._version import __version__

_EXPORTS = {
    "Batch": "hpcbatch.client", "Job": "hpcbatch.client", "Task": "hpcbatch.client",
    "HpcBatchError": "hpcbatch.errors", "NotFound": "hpcbatch.errors",
    "ValidationError": "hpcbatch.errors", "JobSpec": "hpcbatch.models",
    "PoolSpec": "hpcbatch.models", "TaskSpec": "hpcbatch.models",
    "MultiInstanceSpec": "hpcbatch.models", "KernelResult": "hpcbatch.kernelrun",
    "KernelRunError": "hpcbatch.kernelrun",
    "as_completed": "hpcbatch.executor",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hpcbatch' has no attribute {name!r}")
