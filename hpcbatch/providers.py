"""Where nodes come from: the ``local`` provider (this machine) and ``ssh`` (a host list).

An SSH pool's ``provider_config`` holds its hosts (name, hostname, port, user),
the client key, the known_hosts file (checked strictly), an optional ssh_config,
the remote python, the node root and the nodes' authorized_keys file (where the
pool's inter-node key goes). ``ssh_pool_config`` builds it from a pool.json spec
(what ``hpcbatch cluster up`` writes) or from a host list, through
:func:`hpcbatch.ssh.targets_from_spec`, which resolves and checks every host.
Local pools are built into the coordinator (N agents on this machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcbatch.errors import ValidationError
from hpcbatch.ssh import GroupResult, SSHTarget, connect, parallel, targets_from_spec

# what a pool spec (pool.json) may say; anything else is a typo worth naming
SPEC_FIELDS = ("provider", "hosts", "user", "port", "key", "known_hosts", "ssh_config",
               "connect_timeout_s", "python", "node_root", "authorized_keys",
               "node_ssh_config")
_PATH_FIELDS = ("key", "known_hosts", "ssh_config")


def _read_spec(spec: str) -> tuple[dict[str, Any], Path]:
    path = Path(spec).expanduser()
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValidationError("--spec", f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValidationError("--spec", f"{path} is not a readable JSON file: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValidationError("--spec", f"{path} must hold a JSON object with a 'hosts' list")
    unknown = sorted(set(cfg) - set(SPEC_FIELDS))
    if unknown:
        raise ValidationError("--spec", f"{path} has unknown field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(SPEC_FIELDS)}")
    if cfg.get("provider", "ssh") != "ssh":
        raise ValidationError("--spec", f"{path}: provider {cfg['provider']!r} is not 'ssh'")
    return cfg, path.resolve().parent


def ssh_pool_config(*, spec: str | None = None, hostlist: str | None = None,
                    user: str | None = None, key: str | None = None,
                    known_hosts: str | None = None, ssh_config: str | None = None,
                    port: int | None = None, python: str | None = None,
                    node_root: str | None = None,
                    authorized_keys: str | None = None) -> dict[str, Any]:
    """Validate and normalise an SSH pool's provider config (no connection made).

    Options given here win over the spec file's."""
    if spec:
        cfg, base = _read_spec(spec)
    elif hostlist:
        cfg, base = {"hosts": hostlist}, Path.cwd()
    else:
        raise ValidationError("pool", "an ssh pool needs --spec FILE or --ssh HOSTLIST")
    for field in _PATH_FIELDS:  # relative paths in a spec file are the file's
        if cfg.get(field):
            cfg[field] = str((base / Path(cfg[field]).expanduser()).resolve())
    for k, v in (("user", user), ("key", key), ("known_hosts", known_hosts),
                 ("ssh_config", ssh_config), ("port", port), ("python", python),
                 ("node_root", node_root), ("authorized_keys", authorized_keys)):
        if v is not None:  # given here: relative to where the command runs
            cfg[k] = str(Path(v).expanduser().resolve()) if k in _PATH_FIELDS else v
    if cfg.get("key") and not Path(cfg["key"]).is_file():
        raise ValidationError("--key", f"key file {cfg['key']} does not exist")
    if cfg.get("ssh_config") and not Path(cfg["ssh_config"]).is_file():
        raise ValidationError("--ssh-config", f"ssh_config {cfg['ssh_config']} does not exist")
    hosts = targets_from_spec(cfg, base_dir=base)
    if not all(t.known_hosts for t in hosts):
        raise ValidationError("--known-hosts", "an ssh pool checks host keys strictly; give "
                              "the known_hosts file that holds the nodes' keys")
    cfg["hosts"] = [{"name": t.name, "hostname": t.hostname, "port": t.port, "user": t.login,
                     "key": t.key_file, "known_hosts": t.known_hosts} for t in hosts]
    cfg["python"] = cfg.get("python") or "python3"
    cfg.pop("provider", None)
    return cfg


def targets(cfg: dict[str, Any]) -> list[SSHTarget]:
    """The stored hosts of an SSH pool as connectable targets."""
    timeout = float(cfg.get("connect_timeout_s") or 10.0)
    return [SSHTarget(h["name"], h["hostname"], h["port"], h["user"],
                      h.get("key") or cfg.get("key"),
                      h.get("known_hosts") or cfg.get("known_hosts"), timeout)
            for h in cfg["hosts"]]


def preflight(cfg: dict[str, Any], trust_on_first_use: bool = False,
              timeout_s: float = 30) -> GroupResult:
    """Connect to every host once (host key, key, reachability), in parallel."""
    def probe(t: SSHTarget) -> str:
        client = connect(t, trust_on_first_use=trust_on_first_use)
        client.close()
        return "ok"
    return parallel(targets(cfg), probe, timeout_s)


def read_node_file(cfg: dict[str, Any], node_id: str, path: str) -> bytes:
    """A file of an SSH pool's node, read over SFTP (task logs of remote nodes)."""
    found = [t for t in targets(cfg) if t.name == node_id]
    if not found:
        raise ValidationError("node", f"{node_id!r} is not a node of this pool")
    client = connect(found[0])
    try:
        sftp = client.open_sftp()
        try:
            with sftp.open(path, "r") as f:
                return f.read()
        finally:
            sftp.close()
    finally:
        client.close()
