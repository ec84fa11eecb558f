"""Errors a user can act on.

Every error here carries one readable line: what was wrong (the field, host or
file) and how to fix it. The CLI prints it as ``error: <line>`` and exits 2; the
API maps it to a 4xx answer.
"""

from __future__ import annotations


class HpcBatchError(Exception):
    """Base of every error hpcbatch raises on purpose."""

    exit_code = 2


class ValidationError(HpcBatchError, ValueError):
    """A value failed a rule; names the field and the rule."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.rule = message
        super().__init__(f"{field}: {message}")


class NotFound(HpcBatchError, LookupError):
    """A pool, job, node or task that does not exist."""


class Conflict(HpcBatchError):
    """The request clashes with state already accepted (duplicate id, wrong state)."""


class CoordinatorBusy(HpcBatchError):
    """Another coordinator already owns this home directory."""


class StorageFull(HpcBatchError):
    """A write found no space left (the disk or the database's limit); nothing was written.
    The message names the directory that is full."""
