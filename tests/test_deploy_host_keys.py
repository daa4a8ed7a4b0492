"""known_hosts as OpenSSH reads it (issue 9): patterns, negations, hashed names, markers.

Each case is checked against OpenSSH's own client (``ssh -o StrictHostKeyChecking=yes``) and a real
sshd on 127.0.0.1, so the expected outcome comes from OpenSSH, not from this file.
"""

from __future__ import annotations

import shutil
import subprocess

import paramiko
import pytest

from deploy.device import Device
from deploy.ssh_config import HostSpec
from deploy.errors import HostKeyError
from tests.sshd import keygen

pytestmark = [pytest.mark.sshd,
              pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH's client (ssh) is not installed")]


def _openssh_says(server, known_hosts) -> str:
    """What OpenSSH's ssh decides about the server's key with only ``known_hosts``."""
    done = subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "HostKeyAlgorithms=ssh-ed25519", "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no",
         "-o", "IdentitiesOnly=yes", "-i", str(server.key_path), "-p", str(server.port),
         f"{server.user}@{server.host}", "true"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode == 0:
        return "trusted"
    if "REVOKED" in done.stderr:
        return "revoked"
    if "IDENTIFICATION HAS CHANGED" in done.stderr:
        return "changed"
    if "host key is known" in done.stderr or "Host key verification failed" in done.stderr:
        return "unknown"
    return f"other: {done.stderr.strip()}"


def _we_say(server, known_hosts, accept_new: bool = False) -> str:
    try:
        with Device.connect(HostSpec.parse(server.spec),
                            server.connect_options(known_hosts=known_hosts, accept_new_host_key=accept_new)):
            return "trusted"
    except HostKeyError as error:
        message = str(error)
        if "REVOKED HOST KEY" in message:
            return "revoked"
        if "HOST KEY CHANGED" in message:
            return "changed"
        if "unknown host" in message:
            return "unknown"
        return f"other: {message}"


def _cases(server, tmp_path) -> dict:
    key = server.known_hosts_line.split(" ", 1)[1]  # "ssh-ed25519 BASE64" of the server
    other = " ".join(keygen(tmp_path / "other_ed25519").with_suffix(".pub").read_text().split()[:2])
    rsa = tmp_path / "other_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    other_rsa = " ".join(rsa.with_suffix(".pub").read_text().split()[:2])
    name = f"[127.0.0.1]:{server.port}"
    hashed = paramiko.HostKeys.hash_host(name)
    return {
        "exact": f"{name} {key}",
        "star, right key": f"* {key}",
        "star, another key": f"* {other}",
        "question mark": f"[127.0.0.?]:{server.port} {key}",
        "any port": f"[127.0.0.1]:* {key}",
        "comma list": f"pi.local,{name} {key}",
        "negated": f"*,!{name} {key}",  # OpenSSH then trusts the line for the bare name 127.0.0.1
        "negated, ports only": f"[127.0.0.1]:*,!{name} {key}",
        "negated, another key": f"*,!{name} {other}",
        "upper case pattern": f"[127.0.0.1]:{server.port},PI.LOCAL {key}",
        "hashed, right key": f"{hashed} {key}",
        "hashed, another key": f"{hashed} {other}",
        "another host": f"pi.local {other}",
        "bare name, right key": f"127.0.0.1 {key}",
        "bare name, another key": f"127.0.0.1 {other}",
        "star, another key type": f"* {other_rsa}",
        "star wrong, exact right": f"* {other}\n{name} {key}",
        "revoked by star": f"* {key}\n@revoked * {key}",
        "cert-authority only": f"@cert-authority * {other}",
        "comment and junk": f"# * {other}\n* not-a-key-type AAAA\n{name} {key}",
    }


def test_known_hosts_patterns_match_as_openssh_decides(sshd_factory, tmp_path):
    server = sshd_factory.start(record_host_key=False)
    known = tmp_path / "known_hosts"
    disagreements, seen = [], {}
    for case, text in _cases(server, tmp_path).items():
        known.write_text(text + "\n")
        openssh, ours = _openssh_says(server, known), _we_say(server, known)
        seen[case] = openssh
        if openssh != ours:
            disagreements.append(f"{case}: OpenSSH says {openssh}, edgeprune says {ours}")
    assert not disagreements, "\n".join(disagreements)
    # The cases cover every outcome (else OpenSSH itself did not run as intended).
    assert {"trusted", "changed", "unknown", "revoked"} <= set(seen.values()), seen
    assert seen["star, another key"] == "changed" and seen["negated, ports only"] == "unknown"


def test_accept_new_never_records_over_a_wildcard_line(sshd_factory, edgeprune, tmp_path):
    server = sshd_factory.start(record_host_key=False)
    other = " ".join(keygen(tmp_path / "other").with_suffix(".pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"* {other}\n")
    assert _we_say(server, known, accept_new=True) == "changed"
    cli = edgeprune("ls", server.spec, "-i", server.key_path, "--known-hosts", known, "--accept-new-host-key",
                    "-F", "/dev/null")
    assert cli.code == 2 and "HOST KEY CHANGED" in cli.err and f"{known}:1" in cli.err
    assert len(cli.err.strip().splitlines()) == 1 and "Traceback" not in cli.err
    assert known.read_text() == f"* {other}\n"  # nothing recorded
    assert "Accepted publickey" not in server.log  # refused before authenticating

    # A correct wildcard line is enough: trusted, and nothing is recorded either.
    key = server.known_hosts_line.split(" ", 1)[1]
    known.write_text(f"192.168.*,[127.0.0.1]:* {key}\n")
    assert _we_say(server, known, accept_new=True) == "trusted"
    assert known.read_text() == f"192.168.*,[127.0.0.1]:* {key}\n"


def test_the_key_type_known_hosts_records_is_the_one_negotiated(sshd_factory, tmp_path):
    """A device with an Ed25519 and an RSA host key, known by its RSA key only: trusted, as by OpenSSH
    (which offers the known type first), not "changed" because the Ed25519 key came first."""
    rsa = tmp_path / "host_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    rsa.chmod(0o600)
    server = sshd_factory.start(record_host_key=False, config=[f"HostKey {rsa}"])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {' '.join(rsa.with_suffix('.pub').read_text().split()[:2])}\n")
    assert _we_say(server, known) == "trusted"
