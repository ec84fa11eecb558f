"""hpcbatch: a self-hosted batch service for HPC clusters you own."""

from hpcbatch._version import __version__
from hpcbatch.client import Batch, Job, Task
from hpcbatch.errors import HpcBatchError, NotFound, ValidationError
from hpcbatch.models import JobSpec, PoolSpec, TaskSpec

__all__ = ["Batch", "Job", "Task", "JobSpec", "PoolSpec", "TaskSpec", "HpcBatchError",
           "NotFound", "ValidationError", "__version__"]
