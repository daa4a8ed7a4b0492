"""Host keys, checked as OpenSSH checks them: known_hosts patterns, ``accept-new``, fingerprints.

paramiko's own ``HostKeys`` only knows exact and hashed names: a line for ``*`` or ``192.168.1.*``
is invisible to it, so a wildcard line with another key was "unknown" (and ``accept-new`` recorded
the impostor's key) where OpenSSH says HOST KEY CHANGED. So paramiko is given no keys at all and
every server key reaches :class:`KnownHostsPolicy`, which decides as OpenSSH does, in this order:

1. a ``@revoked`` line that matches the host and lists this key: refused, whatever else is there;
2. a plain line that matches the host and lists this key: trusted;
3. a plain line that matches the host with another key (of any type, as OpenSSH 9 decides): HOST
   KEY CHANGED, refused (``--accept-new-host-key`` never overrides it);
4. for a port other than 22, a plain line for the bare host name that lists this key: trusted
   (OpenSSH's "found matching key w/out port");
5. otherwise the host is unknown: recorded with ``accept-new``, else refused with its fingerprint.

As OpenSSH does, the key types known for the host are offered first in the key exchange
(:func:`prefer_key_types`), so the server shows the key that known_hosts records.

Host fields match like OpenSSH's ``match_hostname``: comma lists, ``*`` and ``?`` wildcards,
``!negation`` (a negated match rules the line out), case-insensitive, hashed ``|1|salt|hash``
entries, and ``[host]:port`` names for ports other than 22. ``@cert-authority`` lines are skipped
(host certificates are not supported).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import paramiko

from deploy.errors import HostKeyError

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as OpenSSH prints it: ``SHA256:base64`` without padding."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class KnownHost:
    """One usable known_hosts line: its marker ("" or "@revoked"), host field and key, and where it is."""

    marker: str
    hosts: str
    key: paramiko.PKey
    where: str  # "FILE:LINE", for messages


def host_matches(hosts: str, name: str) -> bool:
    """Whether a known_hosts host field covers ``name`` (``host`` or ``[host]:port``), as OpenSSH decides."""
    if hosts.startswith("|1|"):
        # A hashed field names exactly one host (no lists, no wildcards).
        return hmac.compare_digest(paramiko.HostKeys.hash_host(name, hosts), hosts)
    matched = False
    for pattern in hosts.split(","):
        negated = pattern.startswith("!")
        if _pattern_matches(pattern[1:] if negated else pattern, name):
            if negated:
                return False  # OpenSSH: a negated match rules the whole line out
            matched = True
    return matched


def _pattern_matches(pattern: str, name: str) -> bool:
    # Only * and ? are wildcards (fnmatch would read "[127.0.0.1]:22" as a character class).
    regex = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name.lower(), flags=re.DOTALL) is not None


def read_known_hosts(files: Iterable[Optional[Path]]) -> List[KnownHost]:
    """The plain and ``@revoked`` lines of every existing file (``~/.ssh/known_hosts``, ``--known-hosts``).

    Comments, ``@cert-authority`` lines and lines with a key paramiko cannot read are skipped, as
    OpenSSH skips what it cannot use (paramiko's own loader gives up on the whole file).
    """
    found: List[KnownHost] = []
    for path in files:
        if path is None or not Path(path).expanduser().is_file():
            continue
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise HostKeyError(f"cannot read known_hosts file {path}: {error.strerror}") from None
        for number, line in enumerate(text.splitlines(), 1):
            entry = _parse(line, f"{path}:{number}")
            if entry is not None:
                found.append(entry)
    return found


def _parse(line: str, where: str) -> Optional[KnownHost]:
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = ""
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
        if marker != REVOKED:
            return None  # @cert-authority (unsupported) or a marker OpenSSH would reject
    if len(fields) < 3:
        return None
    try:
        key = paramiko.PKey.from_type_string(fields[1], base64.b64decode(fields[2]))
    except Exception:  # noqa: BLE001 - any line paramiko cannot read (unknown type, bad base64...) is skipped
        return None
    return KnownHost(marker, fields[0], key, where)


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Every server key comes here (paramiko holds none): trust, refuse or record it as OpenSSH would.

    ``record_in``: the file an unknown key is appended to (``accept-new``), or None to refuse it.
    """

    def __init__(self, entries: List[KnownHost], record_in: Optional[Path] = None):
        self.entries = entries
        self.record_in = record_in

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        names = lookup_names(hostname)
        self._refuse_revoked(hostname, key)
        trusted = self._trusted(hostname)
        if any(entry.key == key for entry in trusted):
            return
        if trusted:
            # OpenSSH: any other key recorded for the host (of any type) means the key changed.
            raise HostKeyError(changed_message(hostname, key, trusted[0]))
        if len(names) > 1:
            # OpenSSH also accepts the key recorded for the bare host name ("found matching key w/out port").
            self._refuse_revoked(names[1], key)
            if any(entry.key == key for entry in self._trusted(names[1])):
                return
        if self.record_in is None:
            raise HostKeyError(
                f"unknown host {hostname}: its {key.get_name()} key is {fingerprint(key)}; if that is right, "
                "run again with --accept-new-host-key (or add it to known_hosts with ssh-keyscan)")
        record_host_key(self.record_in, hostname, key)

    def _refuse_revoked(self, name: str, key: paramiko.PKey) -> None:
        if any(entry.marker == REVOKED and entry.key == key and host_matches(entry.hosts, name)
               for entry in self.entries):
            raise HostKeyError(revoked_message(name, key))

    def _trusted(self, name: str) -> List[KnownHost]:
        return [entry for entry in self.entries if entry.marker == "" and host_matches(entry.hosts, name)]

    def known_key_types(self, hostname: str) -> List[str]:
        """Key types known for ``hostname`` (``[host]:port`` first, then the bare name), most wanted first.

        The transport offers these host key algorithms first, as OpenSSH does, so a device with an
        RSA and an Ed25519 key is checked against the one that known_hosts records.
        """
        types: List[str] = []
        for name in lookup_names(hostname):
            for entry in self._trusted(name):
                if entry.key.get_name() not in types:
                    types.append(entry.key.get_name())
        return types


def lookup_names(hostname: str) -> List[str]:
    """``[host]:port`` and then ``host`` (OpenSSH's fallback for ports other than 22), or just ``host``."""
    match = re.fullmatch(r"\[(.+)\]:(\d+)", hostname)
    return [hostname, match[1]] if match else [hostname]


def prefer_key_types(transport: paramiko.Transport, known: List[str]) -> None:
    """Put the host key algorithms of the ``known`` key types first in what ``transport`` offers."""
    options = transport.get_security_options()
    wanted = []
    for key_type in known:
        wanted += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if key_type == "ssh-rsa" else [key_type]
    first = [name for name in wanted if name in options.key_types]
    if first:
        options.key_types = first + [name for name in options.key_types if name not in first]


def record_host_key(path: Path, hostname: str, key: paramiko.PKey) -> None:
    """Append one known_hosts line (paramiko's ``save_host_keys`` would rewrite the file, dropping comments)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="ascii") as handle:
        handle.write(("\n" if needs_newline else "") + f"{hostname} {key.get_name()} {key.get_base64()}\n")


def changed_message(hostname: str, key: paramiko.PKey, recorded: KnownHost) -> str:
    """The one line a changed host key is refused with."""
    return (f"{hostname}: HOST KEY CHANGED: the server offered {key.get_name()} {fingerprint(key)} but known_hosts "
            f"records {fingerprint(recorded.key)} for it ({recorded.where}: {recorded.hosts}); refusing (someone "
            "may be impersonating the device). If the device was reinstalled, remove or fix that line")


def revoked_message(hostname: str, key: paramiko.PKey) -> str:
    """The one line a revoked host key is refused with."""
    return (f"{hostname}: REVOKED HOST KEY: the server offered {key.get_name()} {fingerprint(key)}, which "
            "known_hosts marks @revoked; refusing (--accept-new-host-key does not override a revocation)")
