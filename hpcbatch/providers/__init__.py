"""Where nodes come from: one module per provider, behind :class:`base.Provider`.

* ``local`` (:mod:`.local`): N agents on this machine.
* ``ssh`` (:mod:`.ssh`): a host list reached over SSH, host keys checked strictly.

``provider_for(spec, home)`` gives the provider of a pool; ``provider_class(name)``
the class (its ``make_spec`` validates what a user gave for a new pool);
``validate_config(name, raw)`` the typed form of a stored ``provider_config``. A
provider module defines ``PROVIDER`` (its class); adding one (Slurm) is adding a
module here and its name to ``hpcbatch.models.PROVIDERS``.

``ssh_pool_config`` and ``targets`` stay importable from here (pool.json handling).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hpcbatch.errors import ValidationError
from hpcbatch.models import PROVIDERS, PoolSpec
from hpcbatch.providers.base import NodeDesc, Provider, home_id

if TYPE_CHECKING:
    from hpcbatch.providers.local import LocalConfig
    from hpcbatch.providers.ssh import SSHConfig

    ProviderConfig = LocalConfig | SSHConfig

__all__ = ["NodeDesc", "Provider", "home_id", "files_here", "provider_class", "provider_for",
           "provider_of_options",
           "validate_config", "ssh_pool_config", "targets", "SPEC_FIELDS"]


def provider_class(name: str) -> type[Provider]:
    """The Provider subclass of a provider name ('local', 'ssh')."""
    if name not in PROVIDERS:
        raise ValidationError("pool.provider", f"{name!r} is not one of {', '.join(PROVIDERS)}")
    return importlib.import_module(f"hpcbatch.providers.{name}").PROVIDER


def files_here(name: str | None) -> bool:
    """Whether a pool of this provider has its nodes' files on this machine (its tasks
    see this machine's directories and Python); None, the embedded local pool, does."""
    return name is None or provider_class(name).files_here


def provider_for(spec: PoolSpec, home: str | os.PathLike) -> Provider:
    """The provider of a stored pool, on the given home directory."""
    return provider_class(spec.provider)(spec, home)


def provider_of_options(options: Iterable[str], default: str = "local") -> str:
    """The provider whose own options these are (the CLI's --spec / --ssh mean 'ssh');
    ``default`` when none is given."""
    given = {o for o in options}
    if not given:
        return default
    for name in PROVIDERS:
        if given <= provider_class(name).options:
            return name
    raise ValidationError("pool", f"options {', '.join(sorted(given))} do not belong to one "
                          f"provider ({', '.join(PROVIDERS)})")


def validate_config(provider_name: str, raw: Mapping[str, Any]) -> ProviderConfig:
    """A stored provider_config (a JSON dict) as the provider's typed config."""
    return provider_class(provider_name).parse_config(raw)


_SSH_NAMES = ("ssh_pool_config", "targets", "SPEC_FIELDS", "SSHConfig")


def __getattr__(name: str) -> Any:
    if name in _SSH_NAMES:  # not imported up front: paramiko costs 0.1 s per CLI call
        return getattr(importlib.import_module("hpcbatch.providers.ssh"), name)
    raise AttributeError(f"module 'hpcbatch.providers' has no attribute {name!r}")
