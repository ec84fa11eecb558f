"""What bootstrap installs on an SSH pool's nodes besides the agent: inter-node trust.

With ``inter_node_communication`` on, a pool gets its own ed25519 key pair (kept
under ``$HPCBATCH_HOME/pools/<pool>/``, made once) and every node receives, in
``<node root>/ssh/``:

* ``id_ed25519``   the pool's private key (mode 0600)
* ``known_hosts``  every node's host key under its alias (``HostKeyAlias``), taken
                   from the known_hosts file the coordinator checked them against
* ``config``       one ``Host <node>`` block per node: HostName, Port, User,
                   IdentityFile, UserKnownHostsFile, StrictHostKeyChecking yes

and the pool's public key is appended to the node's authorized_keys (the pool
spec's ``authorized_keys``, by default ``~/.ssh/authorized_keys``), marked with
the pool's name so ``revoke`` can take it out again. MPI on the primary then
reaches the others with ``ssh -F $HPCBATCH_SSH_CONFIG <node>``: strict host keys,
and the user's own ``~/.ssh/config`` and ``known_hosts`` are never read or written.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import threading
from collections.abc import Iterable
from pathlib import Path

import paramiko

from hpcbatch.ssh import SSHError, SSHTarget, sftp_makedirs

DEFAULT_AUTHORIZED_KEYS = ".ssh/authorized_keys"
SSH_DIR = "ssh"  # under the node root
_AUTHORIZED_LOCK = threading.Lock()  # nodes sharing one home must not interleave edits


def _quote(path: str) -> str:
    """A path as ssh_config reads it (double quotes; they cannot hold a '"')."""
    if '"' in path or "\n" in path:
        raise SSHError("pool", f"path {path!r} cannot be written into an ssh_config")
    return f'"{path}"'


def generate_key(comment: str) -> tuple[str, str]:
    """A new ed25519 key pair: (OpenSSH private key text, 'ssh-ed25519 AAAA... comment')."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, f"{public} {comment}"


@dataclasses.dataclass
class PoolTrust:
    """A pool's key pair and the node aliases it lets nodes use to reach each other."""

    pool_id: str
    private_key: str
    public_key: str  # one authorized_keys line
    targets: list[SSHTarget]
    host_keys: dict[str, paramiko.PKey]  # node name -> its verified host key

    @property
    def marker(self) -> str:
        return f"hpcbatch-pool:{self.pool_id}"

    @classmethod
    def load_or_create(cls, directory: Path, pool_id: str,
                       targets: Iterable[SSHTarget]) -> PoolTrust:
        """The pool's key pair from ``directory`` (made there, mode 0600, on first use),
        and each target's host key from its known_hosts file."""
        targets = list(targets)
        key_path = directory / "id_ed25519"
        pub_path = directory / "id_ed25519.pub"
        if not (key_path.is_file() and pub_path.is_file()):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            private, public = generate_key(f"hpcbatch-pool:{pool_id}")
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(private)
            pub_path.write_text(public + "\n")
        host_keys: dict[str, paramiko.PKey] = {}
        tables: dict[str, paramiko.HostKeys] = {}
        for t in targets:
            if t.known_hosts not in tables:
                path = os.path.expanduser(t.known_hosts or "")
                tables[t.known_hosts] = paramiko.HostKeys(path if os.path.isfile(path)
                                                          else None)
            found = tables[t.known_hosts].lookup(t.known_hosts_name) or {}
            if found:
                host_keys[t.name] = next(iter(found.values()))
        return cls(pool_id, key_path.read_text(), pub_path.read_text().strip(), targets,
                   host_keys)

    def known_hosts(self) -> str:
        return "".join(f"{name} {key.get_name()} {key.get_base64()}\n"
                       for name, key in self.host_keys.items())

    def ssh_config(self, ssh_dir: str) -> str:
        """The node-side ssh_config; ``ssh_dir`` is where its key and known_hosts are."""
        key = _quote(posixpath.join(ssh_dir, "id_ed25519"))
        known = _quote(posixpath.join(ssh_dir, "known_hosts"))
        head = f"# written by hpcbatch for pool {self.pool_id}: ssh -F THIS_FILE <node>\n"
        return head + "".join(
            f"Host {t.name}\n"
            f"  HostName {t.hostname}\n"
            f"  Port {t.port}\n"
            f"  User {t.login}\n"
            f"  HostKeyAlias {t.name}\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 10\n"
            "  LogLevel ERROR\n" for t in self.targets)

    def install(self, client: paramiko.SSHClient, node_root: str,
                authorized_keys: str | None, node: str) -> str:
        """Write the key, known_hosts and config under ``node_root/ssh`` and authorize the
        pool key on ``node``; returns the ssh_config's path on the node."""
        ssh_dir = posixpath.join(node_root, SSH_DIR)
        label = getattr(client, "hpcbatch_target", None)
        label = label.label if label else node
        if node not in self.host_keys:  # the others could not check it: refuse it here
            target = next(t for t in self.targets if t.name == node)
            raise SSHError(label, f"no host key for {target.known_hosts_name} in known_hosts "
                           f"file {target.known_hosts}, so the other nodes could not verify "
                           "it; add its key there (or recreate the pool with "
                           "--trust-on-first-use)")
        sftp = client.open_sftp()
        try:
            sftp_makedirs(sftp, ssh_dir, label)
            sftp.chmod(ssh_dir, 0o700)
            _put_text(sftp, posixpath.join(ssh_dir, "id_ed25519"), self.private_key, 0o600)
            _put_text(sftp, posixpath.join(ssh_dir, "known_hosts"), self.known_hosts(), 0o644)
            config = posixpath.join(ssh_dir, "config")
            _put_text(sftp, config, self.ssh_config(ssh_dir), 0o644)
            self._authorize(sftp, _home_path(sftp, authorized_keys or DEFAULT_AUTHORIZED_KEYS),
                            label)
            return config
        except OSError as exc:
            raise SSHError(label, f"installing the pool's inter-node SSH trust failed: "
                           f"{exc.strerror or exc}") from None
        finally:
            sftp.close()

    def _authorize(self, sftp: paramiko.SFTPClient, path: str, label: str) -> None:
        body = self.public_key.split()[1]
        with _AUTHORIZED_LOCK:
            try:
                with sftp.open(path, "r") as f:
                    current = f.read().decode(errors="replace")
            except FileNotFoundError:
                sftp_makedirs(sftp, posixpath.dirname(path), label)
                current = ""
            if any(line.split()[1:2] == [body] for line in current.splitlines()
                   if line.strip() and not line.startswith("#")):
                return
            with sftp.open(path, "a") as f:
                sep = "" if not current or current.endswith("\n") else "\n"
                f.write(f"{sep}{self.public_key}\n".encode())
            sftp.chmod(path, 0o600)

    def revoke(self, client: paramiko.SSHClient, authorized_keys: str | None) -> bool:
        """Take the pool's key out of the node's authorized_keys; True if it was there."""
        body = self.public_key.split()[1]
        sftp = client.open_sftp()
        try:
            path = _home_path(sftp, authorized_keys or DEFAULT_AUTHORIZED_KEYS)
            with _AUTHORIZED_LOCK:
                try:
                    with sftp.open(path, "r") as f:
                        lines = f.read().decode(errors="replace").splitlines(keepends=True)
                except FileNotFoundError:
                    return False
                kept = [ln for ln in lines if ln.split()[1:2] != [body]]
                if len(kept) == len(lines):
                    return False
                _put_text(sftp, path, "".join(kept), 0o600)
                return True
        finally:
            sftp.close()


def _home_path(sftp: paramiko.SFTPClient, path: str) -> str:
    path = path[2:] if path.startswith("~/") else path
    return path if path.startswith("/") else posixpath.join(sftp.normalize("."), path)


def _put_text(sftp: paramiko.SFTPClient, path: str, text: str, mode: int) -> None:
    """Write a whole file under a temporary name, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with sftp.open(tmp, "w") as f:
        f.write(text.encode())
    sftp.chmod(tmp, mode)
    sftp.posix_rename(tmp, path)


def resolve_root(sftp: paramiko.SFTPClient, root: str) -> str:
    """A node root as an absolute path on the node (``~/x`` and relative ones from home)."""
    return _home_path(sftp, root.rstrip("/") or "/")
