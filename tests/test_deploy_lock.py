"""The per-root deploy lock (deploy/root_lock.py): real sshd, real flock on the loopback "device".

While one deploy (or a lock holder started through Device) holds the lock on the root folder, a second deploy or
a rollback to the same root fails with one clear line and touches nothing; once the holder's
connection is gone, the kernel has released the lock and the next deploy goes through.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from deploy.device import Device, temp_stamp
from deploy.ssh_config import HostSpec
from deploy.errors import LockBusy
from deploy.model_dir import load_model_dir
from deploy.root_lock import hold_root_lock, lock_path
from deploy.rollout import DeploySettings, deploy_to_host
from deploy.wheel import build_runtime_wheel
from tests.deploy_fixtures import current_release, deploy_args, tree_snapshot
from tests.sshd import device_python

pytestmark = pytest.mark.sshd

BUSY = "another edgeprune deploy or rollback is running on"


def _settled(model_folder: Path) -> dict:
    """tree_snapshot of a model's folder without the contents of uploads in progress (``.tmp-*``)."""
    def in_upload(path: str) -> bool:
        parts = Path(path).relative_to(model_folder).parts
        return len(parts) > 1 and parts[0].startswith(".tmp-")

    return {path: entry for path, entry in tree_snapshot(model_folder).items() if not in_upload(path)}


def _lock_is_free(root: Path) -> bool:
    """Whether this machine's flock can take the root's lock now (the "device" is this machine)."""
    return subprocess.run(["flock", "--nonblock", str(root), "true"]).returncode == 0


def _wait_until_free(root: Path, seconds: float = 10.0) -> bool:
    # sshd closes a dead session's pipes at once, but the holder's exit is another process's job.
    deadline = time.monotonic() + seconds
    while not _lock_is_free(root):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _big_model(out_dir: Path) -> Path:
    """A real MODEL_DIR over 1 MiB, so its upload takes many SFTP chunks (one can pause it midway)."""
    import torch

    from compressor.export.model_dir import export_model
    from compressor.train.models import DigitsMLP

    torch.manual_seed(5)
    return export_model(DigitsMLP(hidden=(512, 512)), out_dir).out_dir


def test_second_deploy_and_rollback_refused_while_a_deploy_is_uploading(sshd, device_root, model_dirs,
                                                                         edgeprune, tmp_path):
    name = "locked-upload"
    flags = deploy_args(sshd, device_root)
    assert edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags).code == 0
    assert edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", name, *flags).code == 0
    v2 = current_release(device_root, name)
    model_folder = device_root / "models" / name
    settings = DeploySettings(name=name, connect=sshd.connect_options(), python=device_python(),
                              remote_root=str(device_root))
    big = load_model_dir(_big_model(tmp_path / "big"))
    wheel = build_runtime_wheel(tmp_path / "wheel")
    seen = {}

    def meanwhile(count: int) -> None:
        # Runs inside the first deploy, halfway through its upload (it holds the lock).
        seen["sent"] = seen.get("sent", 0) + count
        if "second" in seen or seen["sent"] < 256 * 1024:
            return
        # Outside the upload folder, whose last file is still being written (SFTP writes are pipelined).
        before = _settled(model_folder)
        seen["temp"] = [path.name for path in model_folder.iterdir() if path.name.startswith(".tmp-")]
        seen["second"] = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags)
        seen["rollback"] = edgeprune("rollback", sshd.spec, name, *flags)
        with pytest.raises(LockBusy):
            deploy_to_host(HostSpec.parse(sshd.spec), load_model_dir(model_dirs["v1"]), wheel, settings,
                           log=lambda line: None)
        seen["untouched"] = _settled(model_folder) == before and (model_folder / seen["temp"][0]).is_dir()

    first = deploy_to_host(HostSpec.parse(sshd.spec), big, wheel, settings, log=lambda line: None,
                           progress=meanwhile)

    for result in (seen["second"], seen["rollback"]):
        assert result.code == 2
        assert result.err.strip().splitlines() == [
            f"edgeprune {'deploy' if result is seen['second'] else 'rollback'}: error: {BUSY} {sshd.spec} "
            f"(it holds the lock on {device_root}); try again when it finishes"], result.err
    assert len(seen["temp"]) == 1 and seen["untouched"]  # the first deploy's upload and `current` survived
    # ... and the first deploy finished normally, then let go of the lock.
    assert first.status == "deployed" and current_release(device_root, name) == big.release_id != v2
    assert _lock_is_free(device_root)


def test_lock_held_through_device_blocks_until_its_connection_dies(sshd, device_root, model_dirs, edgeprune):
    name = "locked-holder"
    flags = deploy_args(sshd, device_root)
    assert edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags).code == 0
    v1 = current_release(device_root, name)
    model_folder = device_root / "models" / name
    # An upload left behind by the holder's deploy: a second deploy must not clean it while it runs.
    in_progress = model_folder / f".tmp-{v1}-{temp_stamp()}"
    in_progress.mkdir()
    (in_progress / "model.onnx").write_bytes(b"half an upload")

    holder = Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options())
    lock = hold_root_lock(holder, str(device_root), warn=pytest.fail)
    lock.__enter__()  # held, and never released by us: the connection dies below
    assert not _lock_is_free(device_root)
    before = tree_snapshot(model_folder)
    refused = edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", name, *flags)
    assert refused.code == 2 and BUSY in refused.err and lock_path(str(device_root)) in refused.err
    assert len(refused.err.strip().splitlines()) == 1 and "Traceback" not in refused.err
    assert tree_snapshot(model_folder) == before and current_release(device_root, name) == v1

    sshd.kill_sessions()  # the holder's connection drops without a word: nothing releases the lock by hand
    holder.close()
    assert _wait_until_free(device_root), "the lock went stale after its holder's connection died"
    deployed = edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", name, *flags)
    assert deployed.code == 0, deployed.err
    assert current_release(device_root, name) != v1
    assert not in_progress.exists()  # stale now that its deploy is gone: the next deploy cleans it


def test_lock_is_released_on_exit_and_reentered_on_the_same_connection(sshd, device_root):
    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        for _ in range(2):
            with hold_root_lock(device, str(device_root), warn=pytest.fail):
                assert not _lock_is_free(device_root)
                with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as other:
                    with pytest.raises(LockBusy, match="try again when it finishes"):
                        with hold_root_lock(other, str(device_root), warn=pytest.fail):
                            pass  # pragma: no cover - never entered
            assert _lock_is_free(device_root)
        assert device.run(["true"]).ok  # the connection itself is still usable


def test_device_without_flock_deploys_with_a_warning(sshd, device_root, model_dirs, edgeprune, monkeypatch):
    import deploy.root_lock

    monkeypatch.setattr(deploy.root_lock, "FLOCK", "flock-not-installed-here")
    result = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", "no-flock", *deploy_args(sshd, device_root))
    assert result.code == 0, result.err
    warnings = [line for line in result.out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "`flock` (util-linux) is not installed" in warnings[0]
    assert "without the deploy lock" in warnings[0]
    assert current_release(device_root, "no-flock") == load_model_dir(model_dirs["v1"]).release_id


def test_temp_names_differ_between_threads():
    stamps, together = [], threading.Barrier(8)

    def stamp() -> None:
        together.wait()  # all alive at once: a finished thread's id may be reused
        stamps.append(temp_stamp())

    threads = [threading.Thread(target=stamp) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(stamps)) == len(stamps)


def test_a_killed_clients_remote_command_is_gone_before_the_lock_is_free(sshd, device_root, model_dirs, edgeprune,
                                                                         tmp_path):
    """kill -9 the client while a command it started under the lock runs (as pip would): the lock's holder
    ends that command before the lock goes, so a second deploy never races it."""
    import fcntl
    import os
    import sys

    from tests.bench_fixtures import processes_matching, wait_for

    marker = str(tmp_path / "long-remote-command")
    options = sshd.connect_options()
    # The marker reaches the client through its environment: only the remote command names it.
    client = subprocess.Popen([sys.executable, "-c", f"""
import os
from pathlib import Path
from deploy.device import Device
from deploy.ssh_config import ConnectOptions, HostSpec
from deploy.root_lock import hold_root_lock
options = ConnectOptions(identity_file=Path({str(options.identity_file)!r}), known_hosts=Path({str(options.known_hosts)!r}),
                         user_known_hosts=Path({str(options.user_known_hosts)!r}), ssh_config=None)
device = Device.connect(HostSpec.parse({sshd.spec!r}), options)
with hold_root_lock(device, {str(device_root)!r}, warn=print):
    device.run([{device_python()!r}, "-c", "import time; time.sleep(600)", os.environ["MARKER"]], timeout=900)
"""], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MARKER": marker})
    try:
        wait_for(lambda: processes_matching(marker), 60, "the remote command to start under the lock")
        assert not _lock_is_free(device_root)
        client.kill()
        client.wait()
        # Take the lock the moment it is free, as the next deploy would: the command must be gone by then.
        handle = os.open(device_root, os.O_RDONLY)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the lock was never released"
                    time.sleep(0.005)
            left = processes_matching(marker)
            seen = subprocess.run(["ps", "-o", "pid,ppid,stat,etimes,args", "-p", ",".join(map(str, left)) or "1"],
                                  capture_output=True, text=True).stdout
            fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            os.close(handle)
        assert left == [], f"a killed client's remote command outlived the deploy lock:\n{seen}"
    finally:
        client.kill()
        for pid in processes_matching(marker):
            os.kill(pid, 9)
    deployed = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", "after-kill", *deploy_args(sshd, device_root))
    assert deployed.code == 0, deployed.err
