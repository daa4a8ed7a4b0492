"""Deploy recovers from what a killed deploy or a damaged device leaves behind (issue 9, low items):

- a model name with a trailing newline is refused (``check_name`` with fullmatch);
- a remote command killed by a signal is reported with the signal's name;
- a damaged release that is not current is uploaded again by the next deploy of that artifact
  (before: "checksum mismatch" for that artifact, and for rollbacks to it, for good);
- a deploy killed during its smoke test leaves no release behind (before: an untested release
  that counted toward ``--keep``), and the smoke test itself is ended with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.device import Device
from deploy.ssh_config import HostSpec
from deploy.errors import ModelDirError, RemoteCommandError
from deploy.model_dir import check_name, load_model_dir
from tests.bench_fixtures import processes_matching, wait_for
from tests.deploy_fixtures import current_release, deploy_args
from tests.sshd import device_python

pytestmark = pytest.mark.sshd


def _releases(root: Path, name: str) -> set:
    folder = root / "models" / name / "releases"
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


def test_a_name_with_a_trailing_newline_is_refused(sshd, device_root, model_dirs, edgeprune):
    for bad in ("nl\n", "ok\n\n", "a/b", ".hidden", "x" * 65):
        with pytest.raises(ModelDirError, match="invalid model name"):
            check_name(bad)
    assert check_name("digits-v1.2_final") == "digits-v1.2_final"
    result = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", "nl\n", *deploy_args(sshd, device_root))
    assert result.code == 2 and "invalid model name 'nl\\n'" in result.err
    assert not (device_root / "models" / "nl\n").exists()


def test_a_command_killed_by_a_signal_is_reported_with_its_name(sshd):
    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        killed = device.run(["sh", "-c", "kill -KILL $$"], check=False)
        assert killed.signal == "KILL" and killed.exit_status == 128 + signal.SIGKILL and not killed.ok
        with pytest.raises(RemoteCommandError, match=r"failed \(killed by SIGABRT\)"):
            device.run([device_python(), "-c", "import os; os.abort()"])
        assert device.run(["true"]).ok  # the connection is fine afterwards


@pytest.mark.slow
def test_a_damaged_release_is_uploaded_again_and_can_be_rolled_back_to(sshd, device_root, model_dirs, edgeprune):
    name = "damaged"
    flags = deploy_args(sshd, device_root)
    assert edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags).code == 0
    v1 = current_release(device_root, name)
    assert edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", name, *flags).code == 0
    v2 = current_release(device_root, name)
    weights = device_root / "models" / name / "releases" / v1 / "weights.npz"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # one bit flipped

    refused = edgeprune("rollback", sshd.spec, name, "--to", v1, *flags)
    assert refused.code == 2 and "checksum mismatch" in refused.err and "deploy its MODEL_DIR again" in refused.err
    assert current_release(device_root, name) == v2

    repaired = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags)
    assert repaired.code == 0, repaired.err
    assert f"release {v1} on the device is damaged" in repaired.out and "uploading it again" in repaired.out
    assert current_release(device_root, name) == v1
    assert weights.read_bytes() == (model_dirs["v1"] / "weights.npz").read_bytes()
    assert _releases(device_root, name) == {v1, v2}
    assert not [p for p in (device_root / "models" / name).iterdir() if p.name.startswith(".tmp-")]
    for target in (v2, v1):  # both can be rolled back to again
        back = edgeprune("rollback", sshd.spec, name, "--to", target, *flags)
        assert back.code == 0, back.err
        assert current_release(device_root, name) == target


@pytest.mark.slow
def test_a_deploy_killed_in_its_smoke_test_leaves_no_release(sshd, device_root, model_dirs, edgeprune, tmp_path):
    name = "killed-in-smoke"
    flags = deploy_args(sshd, device_root)
    assert edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags).code == 0
    v1 = current_release(device_root, name)
    v2 = load_model_dir(model_dirs["v2"]).release_id
    smoke = f"edge_runtime check {device_root / 'models' / name}"
    client = subprocess.Popen([sys.executable, "-m", "edgeprune", "deploy", sshd.spec, str(model_dirs["v2"]),
                               "--name", name, "--keep", "1", *map(str, flags)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HOME": str(tmp_path)})
    try:
        wait_for(lambda: processes_matching(smoke) or client.poll() is not None, 120,
                 "the deploy's smoke test to start")
        assert client.poll() is None, "the deploy finished before its smoke test could be caught"
        client.kill()  # kill -9: no clean-up of any kind on our side
        client.wait()
        wait_for(lambda: not processes_matching(smoke), 20, "the orphaned smoke test to be ended")
    finally:
        client.kill()
    assert _releases(device_root, name) == {v1}  # no untested release; nothing for --keep to count
    assert current_release(device_root, name) == v1

    again = edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", name, "--keep", "2", *flags)
    assert again.code == 0, again.err
    assert _releases(device_root, name) == {v1, v2} and current_release(device_root, name) == v2
    assert not [p for p in (device_root / "models" / name).iterdir() if p.name.startswith(".tmp-")]
