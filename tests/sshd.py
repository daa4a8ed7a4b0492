"""Real OpenSSH servers on 127.0.0.1 for tests (deploy's and the bench harness's).

Usage in a test module::

    from tests.sshd import sshd, sshd_factory  # noqa: F401  (pytest fixtures)

    def test_something(sshd):                      # one running server
        sshd.spec                                  # "root@127.0.0.1:PORT"
        sshd.connect_options()                     # deploy.ssh_config.ConnectOptions for it
    def test_fleet(sshd_factory):
        a, b = sshd_factory.start(), sshd_factory.start()
        b.kill()                                   # a dead host

Each server has its own host key; one user key (``factory.key_path``) is authorised on all of them,
and ``factory.known_hosts`` lists every started server's host key as ``[127.0.0.1]:PORT``. Commands
run as the current user on this machine, so the "device" shares this machine's Python.

Under ``CI=true`` a missing ``/usr/sbin/sshd`` fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"


def require_sshd() -> None:
    """Skip (locally) or fail (under CI=true) when OpenSSH's server is not installed."""
    if SSHD.exists():
        return
    message = f"{SSHD} not found: install openssh-server"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def keygen(path: Path, comment: str = "edgeprune-test") -> Path:
    """Make an unencrypted ed25519 key pair at ``path`` (+ ``.pub``), mode 0600; return ``path``."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    path.chmod(0o600)
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago (the server retries if it lost the race)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> List[int]:
    """Pids whose parent is ``pid`` (sshd's per-connection processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class SshServer:
    """One running ``sshd -D`` and everything a client needs to reach it."""

    host: str
    port: int
    user: str
    key_path: Path  # the user's private key, authorised on this server
    known_hosts: Path  # a known_hosts file that lists this server (and its siblings)
    host_key: Path  # this server's private host key (its .pub is what clients should see)
    directory: Path
    process: Optional[subprocess.Popen] = None

    @property
    def spec(self) -> str:
        """``user@127.0.0.1:port``, as the CLI takes it."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_line(self) -> str:
        """This server's known_hosts entry (``[host]:port type base64``)."""
        key_type, key_b64 = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[{self.host}]:{self.port} {key_type} {key_b64}"

    @property
    def log(self) -> str:
        """sshd's log so far (useful in assertion messages)."""
        path = self.directory / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def connect_options(self, **overrides):
        """``deploy.ssh_config.ConnectOptions`` for this server; never reads the real ``~/.ssh``."""
        from deploy.ssh_config import ConnectOptions

        values = dict(identity_file=self.key_path, known_hosts=self.known_hosts, ssh_config=None,
                      user_known_hosts=self.directory / "user_known_hosts", timeout=10.0)
        values.update(overrides)
        return ConnectOptions(**values)

    def cli_args(self) -> List[str]:
        """The connection flags for ``edgeprune deploy/ls/rollback`` against this server."""
        return ["-i", str(self.key_path), "--known-hosts", str(self.known_hosts)]

    def kill_sessions(self) -> None:
        """SIGKILL the per-connection sshd processes: every open connection drops at once."""
        if self.process is not None:
            for pid in _children(self.process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """Stop the server and its sessions (the port then refuses connections)."""
        if self.process is not None and self.process.poll() is None:
            self.kill_sessions()
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class SshdFactory:
    """Starts sshd instances under ``directory``, all authorising one user key."""

    directory: Path
    servers: List[SshServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_sshd()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # sshd refuses files in group/world-writable places
        self.key_path = keygen(self.directory / "user_key")
        self.known_hosts = self.directory / "known_hosts"
        self.known_hosts.touch()
        self.user = _current_user()
        if os.geteuid() == 0:
            # The privilege-separation directory sshd insists on when started as root.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def start(self, record_host_key: bool = True, config: Sequence[str] = ()) -> SshServer:
        """Start one more server and wait until it answers; list it in ``known_hosts`` if asked.

        ``config``: more sshd_config lines (a ``Subsystem sftp ...`` line replaces internal-sftp),
        e.g. to make a device whose SFTP or commands never answer (tests/hung_device.py).
        """
        index = len(self.servers)
        directory = self.directory / f"sshd{index}"
        directory.mkdir(mode=0o700)
        host_key = keygen(directory / "host_ed25519", comment=f"host{index}")
        authorized = directory / "authorized_keys"
        authorized.write_text(self.key_path.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        for attempt in range(5):
            server = SshServer("127.0.0.1", free_port(), self.user, self.key_path, self.known_hosts,
                               host_key, directory)
            if self._launch(server, config):
                break
        else:
            raise RuntimeError(f"sshd did not start:\n{server.log}")
        self.servers.append(server)
        if record_host_key:
            with open(self.known_hosts, "a") as handle:
                handle.write(server.known_hosts_line + "\n")
        return server

    def _launch(self, server: SshServer, extra: Sequence[str] = ()) -> bool:
        config = server.directory / "sshd_config"
        subsystem = [] if any(line.startswith("Subsystem") for line in extra) else ["Subsystem sftp internal-sftp"]
        config.write_text("\n".join([
            f"Port {server.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {server.host_key}",
            f"PidFile {server.directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {server.directory / 'authorized_keys'}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            *subsystem,
            "MaxStartups 100",
            "MaxSessions 100",
            "LogLevel VERBOSE",
            *extra,
            "",
        ]))
        log = server.directory / "sshd.log"
        log.write_text("")
        server.process = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(log)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False  # lost the port race, or a config error (the log says which)
            try:
                with socket.create_connection((server.host, server.port), timeout=1) as probe:
                    if probe.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        server.kill()
        return False

    def stop_all(self) -> None:
        """Kill every server this factory started."""
        for server in self.servers:
            server.kill()


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def device_python() -> str:
    """The interpreter the loopback "device" should use: this one (it sees numpy/scipy/onnxruntime)."""
    return os.path.realpath(sys.executable)


@pytest.fixture
def sshd_factory(tmp_path_factory) -> Iterator[SshdFactory]:
    """A factory for real sshd instances; all are killed at the end of the test."""
    factory = SshdFactory(tmp_path_factory.mktemp("sshd"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def sshd(sshd_factory) -> SshServer:
    """One real sshd on 127.0.0.1 whose host key is already in ``sshd.known_hosts``."""
    return sshd_factory.start()
