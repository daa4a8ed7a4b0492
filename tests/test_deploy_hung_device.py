"""Hung devices (issue 9): a real sshd whose SFTP, or whose commands, never answer.

`edgeprune deploy`, `ls`, `rollback` and `bench` each end by their ``--timeout`` with one line and
exit 2, and SIGINT ends each within 5 s, with nothing of ours left running on either side: no local
process, no remote command of ours (they carry ``EDGEPRUNE_SESSION`` in their environment and the
remote root in their command line), no SSH session left open on the server.

The bounds are behavioural deadlines the issue sets (Ctrl-C within a few seconds; a hung host costs
about ``--timeout``), kept generous for a loaded machine; before the fix each of these runs hung for
good (or ~150 s whatever ``--timeout`` said) and Ctrl-C could deadlock.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.bench_fixtures import kill_leftovers, processes_matching, wait_for
from tests.hung_device import interrupt_cli, pids_with_environment, run_cli, start_hung_server
from tests.sshd import _children, device_python

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

TIMEOUT = 2  # --timeout for the runs that must end by it
PATIENT = 60  # --timeout for the runs that only SIGINT may end early
INTERRUPTED = 130

CASES = [("sftp", "deploy"), ("sftp", "ls"), ("sftp", "rollback"), ("sftp", "bench"),
         ("commands", "deploy"), ("commands", "rollback"), ("commands", "bench")]


def _args(command: str, spec: str, server, root: Path, model_dir: Path, out: Path, timeout: float) -> list:
    flags = [*server.cli_args(), "-F", "/dev/null", "--python", device_python(), "--remote-root", str(root),
             "--timeout", str(timeout)]
    return {
        "deploy": ["deploy", spec, model_dir, "--name", "hung", *flags],
        "ls": ["ls", spec, *flags],
        "rollback": ["rollback", spec, "hung", *flags],
        "bench": ["bench", spec, model_dir, "--kernels", "ort", "--out", out, "--overwrite", *flags],
    }[command]


def _nothing_of_ours_left(server, root: Path) -> None:
    # Remote and local processes of ours name the remote root (flock ROOT, the probe, the CLI itself).
    wait_for(lambda: not processes_matching(str(root)), 10, f"every process naming {root} to end")
    wait_for(lambda: not pids_with_environment("EDGEPRUNE_SESSION="), 10, "every tagged remote command to end")
    wait_for(lambda: not _children(server.process.pid), 10, "the SSH session to close on the server")


@pytest.mark.parametrize("mode, command", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_hung_device_ends_by_timeout_and_by_sigint(mode, command, sshd_factory, model_dirs, tmp_path):
    hung = start_hung_server(sshd_factory, mode, tmp_path / "device")
    root = tmp_path / "edgeprune root"
    root.mkdir()  # rollback looks for it before taking the lock
    home = tmp_path / "home"
    home.mkdir()
    spec = hung.server.spec
    try:
        by_timeout = run_cli(_args(command, spec, hung.server, root, model_dirs["v1"], tmp_path / "out", TIMEOUT),
                             home)
        lines = by_timeout.err.strip().splitlines()
        assert by_timeout.code == 2, by_timeout.err
        assert "Traceback" not in by_timeout.err
        assert lines[-1].startswith(f"edgeprune {command}: error: {spec}") and "did not" in lines[-1], lines
        assert f"within {TIMEOUT} s" in lines[-1] and "--timeout" in lines[-1], lines[-1]
        if command != "bench":  # bench also says where its (empty) report went
            assert len(lines) == 1, lines
        assert by_timeout.seconds < TIMEOUT + 30, by_timeout  # not ~150 s, not forever
        kill_leftovers(hung.marker)  # the device's own hung process: not ours, it outlives any client
        _nothing_of_ours_left(hung.server, root)

        by_sigint = interrupt_cli(_args(command, spec, hung.server, root, model_dirs["v1"], tmp_path / "out",
                                        PATIENT), home, stuck=lambda: bool(processes_matching(hung.marker)))
        assert by_sigint.code == INTERRUPTED and "Traceback" not in by_sigint.err, by_sigint
        assert by_sigint.seconds < 5, by_sigint
        kill_leftovers(hung.marker)
        _nothing_of_ours_left(hung.server, root)
        print(f"\nHUNG {mode:8} {command:8}  --timeout {TIMEOUT}: ended in {by_timeout.seconds:.1f} s (exit "
              f"{by_timeout.code});  SIGINT: ended {by_sigint.seconds:.2f} s after the signal (exit {by_sigint.code})")
    finally:
        kill_leftovers(hung.marker)


def test_a_device_that_freezes_mid_command_is_given_up_on_after_timeout(sshd_factory, tmp_path):
    """The device stops answering altogether while a quiet command runs (SIGSTOP on its SSH session):
    the keepalive gets no answer, and the command fails with RemoteTimeout after about --timeout."""
    import os
    import signal

    from deploy.device import Device
    from deploy.ssh_config import HostSpec
    from deploy.errors import RemoteTimeout

    server = sshd_factory.start()
    marker = str(tmp_path / "quiet-command")
    with Device.connect(HostSpec.parse(server.spec), server.connect_options(timeout=TIMEOUT)) as device:
        process = device.start([device_python(), "-c", "import time; time.sleep(600)", marker], timeout=600)
        wait_for(lambda: processes_matching(marker), 10, "the quiet command to start")
        process.read_until("never printed", timeout=0.5)  # the pid line has come: the command runs
        frozen = _children(server.process.pid)
        frozen += [pid for parent in frozen for pid in _children(parent) if "sshd" in Path(f"/proc/{pid}/comm").read_text()]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RemoteTimeout, match="did not answer \\(keepalive\\)"):
                process.wait()
            assert time.monotonic() - started < 4 * TIMEOUT + 10
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
    kill_leftovers(marker)


def test_a_fleet_deploy_to_hung_devices_ends_by_timeout_and_by_sigint(sshd_factory, model_dirs, tmp_path):
    hung = [start_hung_server(sshd_factory, "sftp", tmp_path / f"device{i}") for i in range(2)]
    # Relative, so each host needs SFTP (its home folder) first; one absolute root would also be one
    # lock for both "devices" (this machine), and the second would be refused at once.
    root = Path(f"edgeprune-hung-fleet-{tmp_path.name}")
    home = tmp_path / "home"
    home.mkdir()
    specs = [h.server.spec for h in hung]

    def args(timeout: float) -> list:
        return ["deploy", *specs, model_dirs["v1"], "--name", "hung", "--jobs", "2", *hung[0].server.cli_args(),
                "-F", "/dev/null", "--python", device_python(), "--remote-root", root, "--timeout", timeout]

    def stuck() -> bool:
        return all(processes_matching(h.marker) for h in hung)

    try:
        by_timeout = run_cli(args(TIMEOUT), home)
        assert by_timeout.code == 1 and "Traceback" not in by_timeout.err, by_timeout
        assert by_timeout.err.strip().splitlines()[-1] == "edgeprune deploy: 2 of 2 hosts failed"
        assert by_timeout.seconds < TIMEOUT + 30, by_timeout
        for h in hung:
            kill_leftovers(h.marker)
        by_sigint = interrupt_cli(args(PATIENT), home, stuck)
        assert by_sigint.code == INTERRUPTED and "Traceback" not in by_sigint.err, by_sigint
        assert by_sigint.seconds < 5, by_sigint
        for h in hung:
            kill_leftovers(h.marker)
            _nothing_of_ours_left(h.server, root)
        print(f"\nHUNG sftp     deploy x2 --timeout {TIMEOUT}: ended in {by_timeout.seconds:.1f} s (exit "
              f"{by_timeout.code});  SIGINT: ended {by_sigint.seconds:.2f} s after the signal (exit {by_sigint.code})")
    finally:
        for h in hung:
            kill_leftovers(h.marker)
