"""Host keys, as OpenSSH checks them: known_hosts files, ``accept-new``, fingerprints.

A changed key never reaches these policies (paramiko raises ``BadHostKeyException`` first, and
deploy.connection turns it into a refusal); an unknown key is refused with its fingerprint unless
the user asked for ``--accept-new-host-key``.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Iterable, Optional

import paramiko

from deploy.errors import HostKeyError


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as OpenSSH prints it: ``SHA256:base64`` without padding."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """OpenSSH's ``StrictHostKeyChecking=accept-new``: record an unknown key, then trust only it.

    Appends exactly one line, so comments and entries paramiko cannot parse survive (paramiko's
    ``save_host_keys`` would rewrite the whole file). A *changed* key never reaches a policy:
    paramiko raises ``BadHostKeyException`` first.
    """

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with open(self.path, "a", encoding="ascii") as handle:
            handle.write(("\n" if needs_newline else "") + f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class RefuseUnknownPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown host with its fingerprint and the flag that would trust it."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"unknown host {hostname}: its {key.get_name()} key is {fingerprint(key)}; if that is right, "
            "run again with --accept-new-host-key (or add it to known_hosts with ssh-keyscan)"
        )


def load_known_hosts(client: paramiko.SSHClient, files: Iterable[Optional[Path]]) -> None:
    """Load ``~/.ssh/known_hosts`` and ``--known-hosts`` (both are checked, as OpenSSH does).

    Lines paramiko cannot parse are skipped, as OpenSSH skips them (paramiko's own loader gives up
    on the whole file). The keys are only read here: new ones are appended by AcceptNewPolicy.
    """
    keys = client.get_host_keys()
    for path in files:
        if path is None or not Path(path).expanduser().is_file():
            continue
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as error:
            raise HostKeyError(f"cannot read known_hosts file {path}: {error.strerror}") from None
        for line in lines:
            if not line.strip() or line.lstrip().startswith(("#", "@")):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError, TypeError, IndexError):
                continue
            if entry is not None:
                for hostname in entry.hostnames:
                    keys.add(hostname, entry.key.get_name(), entry.key)
