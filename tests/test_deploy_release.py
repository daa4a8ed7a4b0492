"""`edgeprune deploy / ls / rollback` end to end: real sshd, real exporter MODEL_DIRs, real runtime."""

from __future__ import annotations

import json

import dataclasses
import shutil
from pathlib import Path

import pytest

from deploy.device import Device
from deploy.ssh_config import HostSpec
from deploy.errors import ConnectionLost, PreflightError, UploadError
from tests.deploy_fixtures import current_release, deploy_args, tree_snapshot
from tests.sshd import device_python

pytestmark = pytest.mark.sshd


def test_deploy_redeploy_new_version_ls_rollback(sshd, device_root, model_dirs, edgeprune):
    name = "cycle"
    flags = deploy_args(sshd, device_root)
    first = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags)
    assert first.code == 0, first.err
    assert "Python 3." in first.out and "numpy" in first.out
    assert "smoke test:" in first.out
    v1 = current_release(device_root, name)
    release = device_root / "models" / name / "releases" / v1
    for file in ("manifest.json", "model.onnx", "weights.npz"):
        assert (release / file).read_bytes() == (model_dirs["v1"] / file).read_bytes()

    # The same artifact again changes nothing at all on the device.
    before = tree_snapshot(device_root)
    again = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags)
    assert again.code == 0, again.err
    assert "nothing to do" in again.out
    assert tree_snapshot(device_root) == before

    second = edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", name, *flags)
    assert second.code == 0, second.err
    v2 = current_release(device_root, name)
    assert v2 != v1 and release.is_dir()  # the old release is kept for rollback

    listing = edgeprune("ls", sshd.spec, *flags)
    assert listing.code == 0, listing.err
    assert "runtime: " in listing.out and "not installed" not in listing.out
    rows = {line.split()[1]: line.split() for line in listing.out.splitlines() if line.startswith(name + " ")}
    assert set(rows) == {v1, v2}
    assert rows[v2][2] == "*" and rows[v1][2] != "*"
    manifest = json.loads((model_dirs["v2"] / "manifest.json").read_text())
    shipped = sum((model_dirs["v2"] / name).stat().st_size for name in (*manifest["files"], "manifest.json"))
    (device_root / "models" / name / "releases" / v2 / "plans.json").write_text("{}")  # the runtime's cache
    listing = edgeprune("ls", sshd.spec, *flags)
    row = next(line for line in listing.out.splitlines() if line.split()[:2] == [name, v2])
    assert f"{manifest['sparsity']:.1%}" in row and f"{shipped / 1024:.1f} KiB" in row  # the size export reports

    back = edgeprune("rollback", sshd.spec, name, *flags)
    assert back.code == 0, back.err
    assert "smoke test:" in back.out
    assert current_release(device_root, name) == v1
    forward = edgeprune("rollback", sshd.spec, name, "--to", v2[:6], *flags)
    assert forward.code == 0, forward.err
    assert current_release(device_root, name) == v2
    unknown = edgeprune("rollback", sshd.spec, name, "--to", "ffffffffffff", *flags)
    assert unknown.code == 2 and "no release" in unknown.err and "Traceback" not in unknown.err


def test_keep_prunes_old_releases_but_never_current(sshd, device_root, model_dirs, edgeprune):
    name = "keep-one"
    flags = deploy_args(sshd, device_root, "--keep", "1")
    assert edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags).code == 0
    v1 = current_release(device_root, name)
    assert edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", name, *flags).code == 0
    releases = sorted(p.name for p in (device_root / "models" / name / "releases").iterdir())
    assert releases == [current_release(device_root, name)] and v1 not in releases


def test_failing_smoke_test_leaves_previous_release_current(sshd, device_root, model_dirs, edgeprune):
    name = "smoke"
    flags = deploy_args(sshd, device_root)
    assert edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", name, *flags).code == 0
    v1 = current_release(device_root, name)
    before = tree_snapshot(device_root / "models" / name / "releases" / v1)
    bad = edgeprune("deploy", sshd.spec, model_dirs["bad_smoke"], "--name", name, *flags)
    assert bad.code == 2
    assert "smoke test failed" in bad.err and len(bad.err.strip().splitlines()) == 1
    assert current_release(device_root, name) == v1
    assert tree_snapshot(device_root / "models" / name / "releases" / v1) == before
    leftovers = [p.name for p in (device_root / "models" / name).iterdir()]
    assert sorted(leftovers) == ["current", "releases"]
    assert [p.name for p in (device_root / "models" / name / "releases").iterdir()] == [v1]


def test_connection_cut_mid_upload_leaves_old_release_intact(sshd, device_root, model_dirs, tmp_path):
    from deploy.model_dir import load_model_dir
    from deploy.rollout import DeploySettings, deploy_to_host
    from deploy.wheel import build_runtime_wheel

    name = "cut"
    big = _big_model(tmp_path / "big")
    wheel = build_runtime_wheel(tmp_path / "wheel")
    settings = DeploySettings(name=name, connect=sshd.connect_options(), python=device_python(),
                              remote_root=str(device_root))
    spec = HostSpec.parse(sshd.spec)
    deploy_to_host(spec, load_model_dir(model_dirs["v1"]), wheel, settings, log=lambda line: None)
    v1 = current_release(device_root, name)
    v1_tree = tree_snapshot(device_root / "models" / name / "releases" / v1)

    sent = [0]

    def cut_after_256k(count: int) -> None:
        sent[0] += count
        if sent[0] >= 256 * 1024:
            sshd.kill_sessions()  # the server side drops the connection mid-upload

    big_model = load_model_dir(big)
    assert big_model.size > 1024 * 1024
    with pytest.raises(ConnectionLost):
        deploy_to_host(spec, big_model, wheel, settings, log=lambda line: None, progress=cut_after_256k)
    assert current_release(device_root, name) == v1
    assert tree_snapshot(device_root / "models" / name / "releases" / v1) == v1_tree
    stale = [p.name for p in (device_root / "models" / name).iterdir() if p.name.startswith(".tmp-")]
    assert len(stale) == 1  # the dead connection could not clean up ...

    result = deploy_to_host(spec, big_model, wheel, settings, log=lambda line: None)
    assert result.status == "deployed" and current_release(device_root, name) == big_model.release_id
    # ... the next deploy does.
    assert not [p for p in (device_root / "models" / name).iterdir() if p.name.startswith(".tmp-")]


def _big_model(out_dir: Path) -> Path:
    """A real MODEL_DIR over 1 MiB (so an upload takes many SFTP chunks)."""
    import torch

    from compressor.export.model_dir import export_model
    from compressor.train.models import DigitsMLP

    torch.manual_seed(4)
    return export_model(DigitsMLP(hidden=(512, 512)), out_dir).out_dir


def test_disk_full_is_one_clear_error(sshd, device_root, model_dirs, tmp_path):
    from deploy.preflight import check, probe

    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        # A real ENOSPC from the device's filesystem, through SFTP.
        with pytest.raises(UploadError, match="disk full"):
            device.put(model_dirs["v1"] / "weights.npz", "/dev/full")
        # Preflight compares the device's real free space with what would be uploaded.
        facts = probe(device, device_python(), str(device_root))
        assert facts.free_bytes > 0
        check(facts, device, device_python(), str(device_root), upload_bytes=1024)
        with pytest.raises(PreflightError, match="not enough disk space"):
            check(dataclasses.replace(facts, free_bytes=10 * 2**20), device, device_python(), str(device_root),
                  upload_bytes=20 * 2**20)


def test_bad_input_is_one_line_and_exit_2(sshd, device_root, model_dirs, edgeprune, tmp_path):
    flags = deploy_args(sshd, device_root)
    missing = edgeprune("deploy", sshd.spec, tmp_path / "nope", *flags)
    assert missing.code == 2 and "not a folder" in missing.err

    corrupt = Path(shutil.copytree(model_dirs["v1"], tmp_path / "corrupt"))
    data = bytearray((corrupt / "weights.npz").read_bytes())
    data[-100] ^= 0xFF
    (corrupt / "weights.npz").write_bytes(bytes(data))
    bad = edgeprune("deploy", sshd.spec, corrupt, *flags)
    assert bad.code == 2 and "does not match its sha256" in bad.err

    (corrupt / "manifest.json").write_text("{truncated")
    assert "not valid JSON" in edgeprune("deploy", sshd.spec, corrupt, *flags).err

    canary = tmp_path / "pwned"
    injected = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", f"$(touch {canary})", *flags)
    assert injected.code == 2 and "invalid model name" in injected.err and not canary.exists()

    no_python = edgeprune("deploy", sshd.spec, model_dirs["v1"], *server_flags(sshd, device_root, "/no/python3"))
    assert no_python.code == 2 and "no Python" in no_python.err

    for result in (missing, bad, injected, no_python):
        assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def server_flags(server, root: Path, python: str) -> list:
    return [*server.cli_args(), "--python", python, "--remote-root", str(root)]


def test_unknown_host_refused_then_accepted_with_flag(sshd_factory, device_root, model_dirs, edgeprune, tmp_path):
    server = sshd_factory.start(record_host_key=False)
    known = tmp_path / "known_hosts"
    flags = ["-i", server.key_path, "--known-hosts", known, "--python", device_python(),
             "--remote-root", device_root]
    refused = edgeprune("ls", server.spec, *flags)
    assert refused.code == 2 and "SHA256:" in refused.err and "--accept-new-host-key" in refused.err
    accepted = edgeprune("deploy", server.spec, model_dirs["v1"], "--name", "newhost", "--accept-new-host-key", *flags)
    assert accepted.code == 0, accepted.err
    assert known.read_text().splitlines() == [server.known_hosts_line]


def test_fleet_deploys_in_parallel_and_reports_the_dead_host(sshd_factory, device_root, model_dirs, edgeprune,
                                                              tmp_path):
    alive, dead = sshd_factory.start(), sshd_factory.start()
    dead.kill()
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# the fleet\n{dead.spec}\n")
    result = edgeprune("deploy", alive.spec, model_dirs["v2"], "--hosts", hosts, "--name", "fleet", "--jobs", "2",
                       *deploy_args(alive, device_root))
    assert result.code == 1  # some hosts failed: not a usage error (2)
    table = result.out[result.out.index("HOST"):].splitlines()
    rows = {line.split()[0]: line.split()[1] for line in table[1:]}
    assert rows == {alive.spec: "deployed", dead.spec: "failed"}
    assert "connection refused" in result.out
    failure = next(line for line in result.out.splitlines() if "FAILED" in line)
    assert failure.count(dead.host) == 1, failure  # the host once, not "HOST: FAILED: HOST: ..."
    assert (device_root / "models" / "fleet" / "current").is_symlink()
