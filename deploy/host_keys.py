"""Host keys, as OpenSSH checks them: known_hosts files, ``accept-new``, fingerprints.

A changed key never reaches these policies (paramiko raises ``BadHostKeyException`` first, and
deploy.connection turns it into a refusal); an unknown key is refused with its fingerprint unless
the user asked for ``--accept-new-host-key``. A key that known_hosts marks ``@revoked`` for the host
is always refused, as OpenSSH refuses it: such keys are kept out of the trusted set, so they always
reach the policy, and :class:`RefuseRevokedPolicy` stands in front of the other two.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path
from typing import Iterable, List, Optional

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


class RefuseRevokedPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse a key listed as ``@revoked`` for the host; hand any other unknown key to ``then``."""

    def __init__(self, revoked: List[paramiko.hostkeys.HostKeyEntry], then: paramiko.MissingHostKeyPolicy):
        self.revoked = revoked
        self.then = then

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if is_revoked(self.revoked, hostname, key):
            raise HostKeyError(revoked_message(hostname, key))
        self.then.missing_host_key(client, hostname, key)


def revoked_message(hostname: str, key: paramiko.PKey) -> str:
    """The one line a revoked host key is refused with."""
    return (f"{hostname}: REVOKED HOST KEY: the server offered {key.get_name()} {fingerprint(key)}, which "
            "known_hosts marks @revoked; refusing (--accept-new-host-key does not override a revocation)")


def is_revoked(revoked: List[paramiko.hostkeys.HostKeyEntry], hostname: str, key: paramiko.PKey) -> bool:
    """Whether ``key`` is listed ``@revoked`` for ``hostname`` (``[host]:port`` for a port other than 22)."""
    return any(entry.key == key and _host_matches(entry.hostnames, hostname) for entry in revoked)


def _host_matches(patterns: List[str], hostname: str) -> bool:
    """OpenSSH's host matching in known_hosts: hashed names, ``*``/``?`` patterns, ``!`` negations."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if pattern.startswith("|1|"):
            hit = hmac.compare_digest(paramiko.HostKeys.hash_host(hostname, pattern), pattern)
        else:
            # Only * and ? are wildcards (fnmatch would read "[127.0.0.1]:22" as a character class).
            regex = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
            hit = re.fullmatch(regex, hostname.lower()) is not None
        if hit and negated:
            return False
        matched = matched or hit
    return matched


def load_known_hosts(client: paramiko.SSHClient,
                     files: Iterable[Optional[Path]]) -> List[paramiko.hostkeys.HostKeyEntry]:
    """Load ``~/.ssh/known_hosts`` and ``--known-hosts`` (both are checked, as OpenSSH does).

    Returns the ``@revoked`` entries, for RefuseRevokedPolicy; a revoked key is never trusted, even
    if another line lists it. ``@cert-authority`` lines are skipped (host certificates are not
    supported). Lines paramiko cannot parse are skipped, as OpenSSH skips them (paramiko's own loader
    gives up on the whole file). The keys are only read here: new ones are appended by AcceptNewPolicy.
    """
    trusted, revoked = [], []
    for path in files:
        if path is None or not Path(path).expanduser().is_file():
            continue
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as error:
            raise HostKeyError(f"cannot read known_hosts file {path}: {error.strerror}") from None
        for line in lines:
            line = line.strip()
            marker, _, rest = line.partition(" ")
            if not line or line.startswith("#") or (line.startswith("@") and marker != "@revoked"):
                continue
            entry = _parse(rest if marker == "@revoked" else line)
            if entry is not None:
                (revoked if marker == "@revoked" else trusted).append(entry)
    keys = client.get_host_keys()
    for entry in trusted:
        for hostname in entry.hostnames:
            if not is_revoked(revoked, hostname, entry.key):
                keys.add(hostname, entry.key.get_name(), entry.key)
    return revoked


def _parse(line: str) -> Optional[paramiko.hostkeys.HostKeyEntry]:
    try:
        return paramiko.hostkeys.HostKeyEntry.from_line(line.strip())
    except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError, TypeError, IndexError):
        return None
