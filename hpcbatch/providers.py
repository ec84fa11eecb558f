"""Where nodes come from: the ``local`` provider (this machine) and ``ssh`` (a host list).

An SSH pool's ``provider_config`` holds its hosts (name, hostname, port, user),
the client key, the known_hosts file (checked strictly), an optional ssh_config,
the remote python and the node root. ``ssh_pool_config`` builds it from a
pool.json spec (what ``hpcbatch cluster up`` writes) or from a hostlist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import paramiko

from hpcbatch.errors import ValidationError
from hpcbatch.hostlist import expand_hostlist
from hpcbatch.ssh import GroupResult, SSHTarget, connect, parallel


def _check_file(field: str, path: str | None, what: str) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValidationError(field, f"{what} {p} does not exist")
    return str(p.resolve())


def ssh_pool_config(*, spec: str | None = None, hostlist: str | None = None,
                    user: str | None = None, key: str | None = None,
                    known_hosts: str | None = None, ssh_config: str | None = None,
                    port: int | None = None, python: str | None = None,
                    node_root: str | None = None) -> dict[str, Any]:
    """Validate and normalise an SSH pool's provider config (no connection made)."""
    cfg: dict[str, Any] = {}
    if spec:
        path = Path(spec).expanduser()
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValidationError("--spec", f"{path} does not exist") from None
        except ValueError as exc:
            raise ValidationError("--spec", f"{path} is not valid JSON: {exc}") from None
        if not isinstance(cfg.get("hosts"), list) or not cfg["hosts"]:
            raise ValidationError("--spec", f"{path} has no 'hosts' list")
    elif hostlist:
        cfg["hosts"] = [{"name": h, "hostname": h} for h in expand_hostlist(hostlist)]
    else:
        raise ValidationError("pool", "an ssh pool needs --spec FILE or --ssh HOSTLIST")
    for k, v in (("user", user), ("key", key), ("known_hosts", known_hosts),
                 ("ssh_config", ssh_config), ("python", python), ("node_root", node_root)):
        if v is not None:
            cfg[k] = v
    cfg["key"] = _check_file("--key", cfg.get("key"), "key file")
    cfg["ssh_config"] = _check_file("--ssh-config", cfg.get("ssh_config"), "ssh_config")
    if not cfg.get("known_hosts"):
        raise ValidationError("--known-hosts", "an ssh pool checks host keys strictly; give "
                              "the known_hosts file that holds the nodes' keys")
    cfg["known_hosts"] = str(Path(cfg["known_hosts"]).expanduser().resolve())
    sshcfg = paramiko.SSHConfig.from_path(cfg["ssh_config"]) if cfg.get("ssh_config") else None
    hosts = []
    for h in cfg["hosts"]:
        if not isinstance(h, dict) or not h.get("name"):
            raise ValidationError("hosts", f"entry {h!r} needs a 'name'")
        look = sshcfg.lookup(h["name"]) if sshcfg else {}
        hosts.append({
            "name": h["name"],
            "hostname": h.get("hostname") or look.get("hostname") or h["name"],
            "port": int(h.get("port") or port or look.get("port") or 22),
            "user": h.get("user") or cfg.get("user") or look.get("user") or _whoami(),
        })
    cfg["hosts"] = hosts
    cfg.setdefault("python", "python3")
    return cfg


def _whoami() -> str:
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


def targets(cfg: dict[str, Any]) -> list[SSHTarget]:
    return [SSHTarget(h["name"], h["hostname"], h["port"], h["user"], cfg.get("key"),
                      cfg["known_hosts"]) for h in cfg["hosts"]]


def preflight(cfg: dict[str, Any], trust_on_first_use: bool = False,
              timeout_s: float = 30) -> GroupResult:
    """Connect to every host once (host key, key, reachability), in parallel."""
    def probe(t: SSHTarget) -> str:
        client = connect(t, trust_on_first_use=trust_on_first_use)
        client.close()
        return "ok"
    return parallel(targets(cfg), probe, timeout_s)
