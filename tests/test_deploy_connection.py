"""deploy.connection and deploy.device against a real sshd: host keys, auth, quoting, timeouts, ssh config."""

from __future__ import annotations

import time

import paramiko
import pytest

from deploy.device import Device
from deploy.remote_command import CommandResult
from deploy.ssh_config import HostSpec
from deploy.errors import AuthError, ConnectError, HostKeyError, RemoteCommandError, RemoteTimeout
from tests.sshd import keygen

pytestmark = pytest.mark.sshd


def test_hostspec_parse():
    assert HostSpec.parse("pi@raspberrypi.local:2222") == HostSpec("raspberrypi.local", "pi", 2222)
    assert HostSpec.parse("10.0.0.7") == HostSpec("10.0.0.7")
    assert HostSpec.parse("root@[::1]:22") == HostSpec("::1", "root", 22)
    assert str(HostSpec.parse("pi@host:2222")) == "pi@host:2222"
    for bad in ("", "a b", "host:99999", "user@", "host:port"):
        with pytest.raises(ConnectError):
            HostSpec.parse(bad)


def test_run_quotes_every_argument_and_drains_both_streams(sshd, tmp_path):
    canary = tmp_path / "pwned"
    hostile = f"x; touch {canary} $(touch {canary}) `touch {canary}` 'quote\" \\ \n$HOME"
    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        echoed = device.run(["printf", "%s", hostile])
        assert echoed.stdout == hostile
        assert not canary.exists()
        # 3 MiB on each stream at once: more than the channel window, deadlocks if read one by one.
        big = device.run(["python3", "-c", "import sys; sys.stdout.write('o' * 3145728); sys.stderr.write('e' * 3145728)"])
        assert (len(big.stdout), len(big.stderr)) == (3145728, 3145728)
        failed = device.run(["sh", "-c", "echo out; echo the reason >&2; exit 3"], check=False)
        assert failed == CommandResult(failed.argv, 3, "out\n", "the reason\n")
        with pytest.raises(RemoteCommandError, match="exit 3.*the reason"):
            device.run(["sh", "-c", "echo the reason >&2; exit 3"])


def test_cwd_that_cannot_be_entered_fails_the_command(sshd, tmp_path):
    folder = tmp_path / "it's here"
    folder.mkdir()
    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        assert device.run(["pwd"], cwd=str(folder)).stdout == f"{folder.resolve()}\n"
        # Before the fix, `cd X && echo $$; exec CMD` ran CMD anyway, in the home folder, and took
        # its first output line for the pid line: this came back as exit 0 with no output.
        missing = device.run(["pwd"], cwd=str(tmp_path / "missing"), check=False)
        assert missing.exit_status != 0 and missing.stdout == ""
        with pytest.raises(RemoteCommandError):
            device.run(["pwd"], cwd=str(tmp_path / "missing"))


def test_timeout_kills_the_remote_command(sshd, tmp_path):
    marker = tmp_path / "still-running"
    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        started = time.monotonic()
        with pytest.raises(RemoteTimeout):
            device.run(["sh", "-c", f"sleep 3 && touch '{marker}'"], timeout=1)
        assert time.monotonic() - started < 3
        # cancel(): a started command dies on the device, not only the channel.
        process = device.start(["sh", "-c", f"sleep 2 && touch '{marker}'"])
        time.sleep(0.5)
        process.cancel()
    time.sleep(2.5)
    assert not marker.exists()


def test_unknown_host_is_refused_with_fingerprint_and_flag(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError) as refused:
        Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options(known_hosts=empty))
    message = str(refused.value)
    assert "SHA256:" in message and "--accept-new-host-key" in message
    assert empty.read_text() == ""  # never auto-accepted


def test_accept_new_records_one_line_then_trusts_only_that_key(sshd_factory, tmp_path):
    server = sshd_factory.start(record_host_key=False)
    known = tmp_path / "known_hosts"
    known.write_text("# my comment\nthis line is not parseable by paramiko\n")
    options = server.connect_options(known_hosts=known, accept_new_host_key=True)
    with Device.connect(HostSpec.parse(server.spec), options) as device:
        assert device.run(["true"]).ok
    lines = known.read_text().splitlines()
    assert lines[:2] == ["# my comment", "this line is not parseable by paramiko"]
    assert lines[2:] == [server.known_hosts_line]
    # Known now: no flag needed, and nothing more is written.
    with Device.connect(HostSpec.parse(server.spec), server.connect_options(known_hosts=known)):
        pass
    assert len(known.read_text().splitlines()) == 3


def test_changed_host_key_is_always_refused(sshd_factory, tmp_path):
    server = sshd_factory.start()
    # The device is "reinstalled": same address, new host key; restart it on the same port.
    server.kill()
    server.host_key.unlink()
    server.host_key.with_suffix(".pub").unlink()
    keygen(server.host_key)
    assert sshd_factory._launch(server), server.log
    for accept_new in (False, True):
        with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
            Device.connect(HostSpec.parse(server.spec), server.connect_options(accept_new_host_key=accept_new))
    server.kill()


def test_revoked_host_key_is_refused_even_with_accept_new(sshd_factory, edgeprune, tmp_path):
    server = sshd_factory.start(record_host_key=False)
    key = server.known_hosts_line.split(" ", 1)[1]  # "TYPE BASE64"
    other = keygen(tmp_path / "other_host").with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    cases = {
        "exact host": f"@revoked [127.0.0.1]:{server.port} {key}\n",
        "any host": f"@revoked * {key}\n",
        "hashed host": f"@revoked {paramiko.HostKeys.hash_host(f'[127.0.0.1]:{server.port}')} {key}\n",
        # Revocation wins over a line that trusts the same key.
        "also trusted": f"{server.known_hosts_line}\n@revoked [127.0.0.1]:* {key}\n",
    }
    for case, text in cases.items():
        known.write_text(text)
        for accept_new in (False, True):
            with pytest.raises(HostKeyError, match="REVOKED HOST KEY") as refused:
                Device.connect(HostSpec.parse(server.spec),
                               server.connect_options(known_hosts=known, accept_new_host_key=accept_new))
            assert "SHA256:" in str(refused.value), case
        assert known.read_text() == text, case  # never recorded
    assert "Accepted publickey" not in server.log  # refused before authenticating

    cli = edgeprune("ls", server.spec, "-i", server.key_path, "--known-hosts", known, "--accept-new-host-key")
    assert cli.code == 2 and "REVOKED HOST KEY" in cli.err
    assert len(cli.err.strip().splitlines()) == 1 and "Traceback" not in cli.err

    # A revocation of another key, or of this key for another host, does not stop this connection.
    known.write_text(f"@revoked [127.0.0.1]:{server.port} {' '.join(other)}\n@revoked pi.local {key}\n"
                     f"@revoked *,![127.0.0.1]:{server.port} {key}\n{server.known_hosts_line}\n")
    with Device.connect(HostSpec.parse(server.spec), server.connect_options(known_hosts=known)) as device:
        assert device.run(["true"]).ok


def test_wrong_key_is_refused(sshd, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(AuthError, match="permission denied"):
        Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options(identity_file=stranger))
    with pytest.raises(AuthError, match="cannot read the key"):
        Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options(identity_file=tmp_path / "missing"))


def test_connection_refused_is_one_clear_error(sshd_factory):
    server = sshd_factory.start()
    server.kill()
    with pytest.raises(ConnectError, match="connection refused"):
        Device.connect(HostSpec.parse(server.spec), server.connect_options())


def test_ssh_config_alias_and_proxyjump(sshd_factory, tmp_path):
    jump, target = sshd_factory.start(), sshd_factory.start()
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host pi-alias\n  HostName 127.0.0.1\n  Port {target.port}\n  User {target.user}\n"
        f"  IdentityFile {target.key_path}\n  IdentitiesOnly yes\n"
        f"Host pi-behind-jump\n  HostName 127.0.0.1\n  Port {target.port}\n  User {target.user}\n"
        f"  IdentityFile {target.key_path}\n  ProxyJump {jump.user}@127.0.0.1:{jump.port}\n"
        f"Host 127.0.0.1\n  IdentityFile {jump.key_path}\n")
    options = target.connect_options(identity_file=None, ssh_config=config)
    with Device.connect(HostSpec.parse("pi-alias"), options) as device:
        assert device.label == f"{target.user}@pi-alias:{target.port}"
        assert device.run(["echo", "hi"]).stdout == "hi\n"
    with Device.connect(HostSpec.parse("pi-behind-jump"), options) as device:
        assert device.run(["echo", "through"]).stdout == "through\n"
    assert "Accepted publickey" in jump.log  # the second connection went through the jump host


def test_ssh_habits_config_known_hosts_and_port_dash_p_and_no_key(sshd, edgeprune, tmp_path, monkeypatch):
    """Issue 21: ``UserKnownHostsFile`` and ``Port`` from ``-F FILE``; ``-p PORT``; no key: which were tried."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # no agent: the keys tried are the files only
    root = tmp_path / "root"
    known = tmp_path / "my_known_hosts"  # the only place this server's key is listed
    known.write_text(sshd.known_hosts_line + "\n")
    config = tmp_path / "config"
    config.write_text(f"Host pi\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                      f"  IdentityFile {sshd.key_path}\n  UserKnownHostsFile {known}\n")
    done = edgeprune("ls", "pi", "-F", config, "--remote-root", root)
    assert done.code == 0 and "runtime: not installed" in done.out, done.err

    bare = f"{sshd.user}@127.0.0.1"
    done = edgeprune("ls", bare, "-p", sshd.port, *sshd.cli_args(), "-F", "/dev/null", "--remote-root", root)
    assert done.code == 0 and f"{bare}:{sshd.port}: {root}" in done.out, done.err
    done = edgeprune("ls", sshd.spec, "-p", sshd.port + 1, *sshd.cli_args(), "-F", "/dev/null")
    assert done.code == 2 and f"-p says {sshd.port + 1}" in done.err and "Traceback" not in done.err

    # No -i, no config, no agent, an empty ~/.ssh: one line naming what was tried, not paramiko's words.
    done = edgeprune("ls", sshd.spec, "--known-hosts", sshd.known_hosts, "-F", "/dev/null")
    assert done.code == 2 and "no key to log in with" in done.err and "~/.ssh/id_ed25519" in done.err, done.err
    assert "ssh-agent (none)" in done.err and len(done.err.strip().splitlines()) == 1, done.err
