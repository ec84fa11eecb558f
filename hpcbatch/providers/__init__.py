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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hpcbatch.errors import ValidationError
from hpcbatch.models import PROVIDERS, PoolSpec
from hpcbatch.providers.base import NodeDesc, Provider, home_id

if TYPE_CHECKING:
    from hpcbatch.providers.local import LocalConfig
    from hpcbatch.providers.ssh import SSHConfig

    ProviderConfig = LocalConfig | SSHConfig

__all__ = ["NodeDesc", "Provider", "home_id", "provider_class", "provider_for",
           "validate_config", "ssh_pool_config", "targets", "SPEC_FIELDS"]


def provider_class(name: str) -> type[Provider]:
    """The Provider subclass of a provider name ('local', 'ssh')."""
    if name not in PROVIDERS:
        raise ValidationError("pool.provider", f"{name!r} is not one of {', '.join(PROVIDERS)}")
    return importlib.import_module(f"hpcbatch.providers.{name}").PROVIDER


def provider_for(spec: PoolSpec, home: str | os.PathLike) -> Provider:
    """The provider of a stored pool, on the given home directory."""
    return provider_class(spec.provider)(spec, home)


def validate_config(provider_name: str, raw: Mapping[str, Any]) -> ProviderConfig:
    """A stored provider_config (a JSON dict) as the provider's typed config."""
    return provider_class(provider_name).parse_config(raw)


_SSH_NAMES = ("ssh_pool_config", "targets", "SPEC_FIELDS", "SSHConfig")


def __getattr__(name: str) -> Any:
    if name in _SSH_NAMES:  # not imported up front: paramiko costs 0.1 s per CLI call
        return getattr(importlib.import_module("hpcbatch.providers.ssh"), name)
    if name in ("preflight", "read_node_file"):
        return globals()[f"_compat_{name}"]
    raise AttributeError(f"module 'hpcbatch.providers' has no attribute {name!r}")


def _compat_preflight(cfg: Mapping[str, Any], trust_on_first_use: bool = False,
                      timeout_s: float = 30):
    """Connect to every host of an SSH provider_config once (the old function form)."""
    from hpcbatch.ssh import connect, parallel

    def probe(t) -> str:
        connect(t, trust_on_first_use=trust_on_first_use).close()
        return "ok"
    return parallel(__getattr__("targets")(cfg), probe, timeout_s)


def _compat_read_node_file(cfg: Mapping[str, Any], node_id: str, path: str) -> bytes:
    """A file of an SSH pool's node over SFTP (the old function form)."""
    from hpcbatch.providers.ssh import SSHProvider
    spec = PoolSpec("compat", "ssh", target_nodes=len(cfg["hosts"]), provider_config=dict(cfg))
    return SSHProvider(spec, os.environ.get("HPCBATCH_HOME", ".")).read_node_file(node_id, path)
