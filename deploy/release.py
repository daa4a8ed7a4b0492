"""Releases on the device: upload, verify, smoke-test, switch ``current`` atomically, prune, roll back.

Layout under the remote root (ARCHITECTURE.md)::

    models/NAME/releases/ID/     # a verified, smoke-tested copy of a MODEL_DIR
    models/NAME/current -> releases/ID
    models/NAME/.tmp-ID-*        # an upload in progress (never read by anything)

The ``current`` link changes only by one rename(2) of a fresh link over it, after the new release has
passed every check, so a failure at any step leaves the previous release current and intact.
Temporary folders are removed at once on an ordinary failure; when the connection itself drops they
cannot be, and the next deploy of the same model on that host removes them first (safe because every
deploy holds the root's lock, :mod:`deploy.root_lock`, so no other upload can be in progress).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
import json
from typing import Any, Callable, Dict, List, Optional

from deploy.device import Device, Progress, temp_stamp
from deploy.errors import ConnectionLost, ReleaseError, RemoteCommandError, RemoteTimeout
from deploy.model_dir import MANIFEST, LocalModel, check_name

Log = Callable[[str], None]
PLANS = "plans.json"  # the runtime's plan cache inside a release (edge_runtime's PLANS_FILE)


def scratch_dir(root: str) -> str:
    """Where bench uploads the models it measures (ARCHITECTURE.md's remote layout): never a release."""
    return posixpath.join(root, "scratch")


def describe_manifest(text: str) -> Dict[str, str]:
    """``{"level", "sparsity", "accuracy"}`` as short strings from a manifest's text ("-" where unknown).

    The manifest on a device is only displayed here, never trusted: anything malformed shows as "-".
    """
    try:
        manifest: Any = json.loads(text)
    except ValueError:
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    level = f"{source.get('method')} {source.get('level')}" if "level" in source else "-"
    number = lambda key: manifest.get(key) if isinstance(manifest.get(key), (int, float)) else None  # noqa: E731
    sparsity, accuracy = number("sparsity"), number("accuracy")
    return {"level": level.replace(" ", ":") if level != "-" else level,
            "sparsity": "-" if sparsity is None else f"{sparsity:.1%}",
            "accuracy": "-" if accuracy is None else f"{accuracy:.1%}"}


@dataclass(frozen=True)
class Release:
    """One release folder on the device."""

    id: str
    deployed: float  # mtime of the folder: when it was (last) deployed
    size: int
    current: bool


class RemoteModel:
    """The folders of one model NAME under a device's remote root."""

    def __init__(self, device: Device, root: str, name: str):
        self.device = device
        self.root = root
        self.name = check_name(name)
        self.base = posixpath.join(root, "models", self.name)
        self.releases_dir = posixpath.join(self.base, "releases")
        self.current_link = posixpath.join(self.base, "current")

    def release_dir(self, release_id: str) -> str:
        return posixpath.join(self.releases_dir, release_id)

    def current_id(self) -> Optional[str]:
        """The id ``current`` points at, or None if the model has no current release."""
        target = self.device.readlink(self.current_link)
        return posixpath.basename(target.rstrip("/")) if target else None

    def releases(self) -> List[Release]:
        """Every release, most recently deployed first (by the folder's mtime, to the nanosecond)."""
        current = self.current_id()
        if not self.device.is_dir(self.releases_dir):
            return []
        listing = self.device.run(["find", self.releases_dir, "-mindepth", "1", "-maxdepth", "1", "-type", "d",
                                   "-printf", "%T@ %f\\n"]).stdout.split("\n")
        stamps = {name: float(stamp) for stamp, _, name in (line.partition(" ") for line in listing) if name}
        sizes = self._shipped_sizes() if stamps else {}
        found = [Release(name, stamp, sizes.get(name, 0), name == current) for name, stamp in stamps.items()]
        return sorted(found, key=lambda release: (release.deployed, release.id), reverse=True)

    def _shipped_sizes(self) -> Dict[str, int]:
        """Bytes of each release's MODEL_DIR files, as export counts a model's size.

        ``plans.json`` is the runtime's cache of measured kernel plans, written on the device and never
        shipped: it is not part of the model, so it is not counted (nor are folder blocks, as ``du`` would).
        """
        listing = self.device.run(["find", self.releases_dir, "-mindepth", "2", "-maxdepth", "2", "-type", "f",
                                   "!", "-name", PLANS, "-printf", "%h\\t%s\\n"]).stdout
        sizes: Dict[str, int] = {}
        for folder, _, size in (line.partition("\t") for line in listing.splitlines()):
            if size.isdigit():
                release = posixpath.basename(folder)
                sizes[release] = sizes.get(release, 0) + int(size)
        return sizes

    def summary(self, release_id: str) -> Dict[str, str]:
        """What ``edgeprune ls`` shows of a release: method and level, sparsity, accuracy (from its manifest)."""
        text = self.device.read_text(posixpath.join(self.release_dir(release_id), MANIFEST)) or ""
        return describe_manifest(text)

    def remove_stale_uploads(self) -> None:
        """Delete ``.tmp-*`` folders left by an upload whose connection dropped.

        Call it only while holding the root's lock (:mod:`deploy.root_lock`): then no other deploy's
        upload can be in progress, and every temporary folder is stale.
        """
        names = self.device.listdir(self.base)
        stale = [posixpath.join(self.base, name) for name in names if name.startswith((".tmp-", ".current-"))]
        if stale:
            self.device.run(["rm", "-rf", "--", *stale])

    def upload(self, model: LocalModel, progress: Optional[Progress] = None) -> str:
        """Upload MODEL_DIR's listed files into a fresh temporary folder and return it (removed again on failure).

        Only regular files inside MODEL_DIR are sent (never through a symlink), manifest.json last.
        """
        self.device.run(["mkdir", "-p", self.releases_dir])
        temp = posixpath.join(self.base, f".tmp-{model.release_id}-{temp_stamp()}")
        self.device.mkdir(temp)
        try:
            self.device.put_listed(model.path, model.upload_order(), temp, progress)
        except (ConnectionLost, RemoteTimeout, KeyboardInterrupt):
            raise  # nothing can be cleaned over a dead connection; the next deploy does it
        except BaseException:
            self.device.run(["rm", "-rf", "--", temp], check=False)
            raise
        return temp

    def verify(self, folder: str, files: dict) -> None:
        """Check every sha256 on the device itself (``sha256sum -c``); ReleaseError on a mismatch."""
        listing = "".join(f"{digest}  {relative}\n" for relative, digest in sorted(files.items()))
        result = self.device.run(["sha256sum", "--check", "--quiet", "-"], cwd=folder,
                                 stdin=listing.encode(), check=False, timeout=600)
        if not result.ok:
            bad = [line.split(":")[0] for line in result.stdout.splitlines() if "FAILED" in line]
            detail = ", ".join(bad) or (result.stderr.strip().splitlines() or [result.describe()])[-1]
            raise ReleaseError(f"{self.device.label}: checksum mismatch on the device: {detail}")

    def verify_release(self, release_id: str) -> None:
        """Re-check a release already on the device against its own manifest's hashes."""
        import json

        folder = self.release_dir(release_id)
        text = self.device.read_text(posixpath.join(folder, MANIFEST))
        try:
            files = dict(json.loads(text or "")["files"])
        except (ValueError, KeyError, TypeError):
            raise ReleaseError(f"{self.device.label}: release {release_id} of {self.name} has no valid manifest") from None
        self.verify(folder, files)

    def smoke_test(self, folder: str, venv_python: str) -> str:
        """Run ``edge-runtime check`` on ``folder`` under the device's runtime; its one line, or ReleaseError."""
        try:
            result = self.device.run([venv_python, "-m", "edge_runtime", "check", folder], check=False, timeout=600)
        except RemoteTimeout as error:
            raise ReleaseError(f"{self.device.label}: smoke test timed out: {error}") from None
        line = (result.stdout.strip() or result.stderr.strip()).splitlines()
        line = line[-1] if line else result.describe()
        if not result.ok:
            raise ReleaseError(f"{self.device.label}: smoke test failed ({result.describe()}): {line}")
        return line

    def promote(self, temp: str, release_id: str, replace: bool = False) -> str:
        """Move a verified, smoke-tested temporary folder to ``releases/ID`` and return that path.

        Only complete releases ever appear under ``releases/`` (a deploy killed before this leaves a
        ``.tmp-`` folder, which never counts toward ``--keep`` and the next deploy removes).
        ``replace``: a damaged copy of the same release is there; it is moved aside (into a ``.tmp-``
        name, so a cut connection leaves it for the next deploy to clean) and this one takes its place.
        """
        target = self.release_dir(release_id)
        if replace and self.device.is_dir(target):
            aside = posixpath.join(self.base, f".tmp-damaged-{release_id}-{temp_stamp()}")
            self.device.rename(target, aside)
            self.device.rename(temp, target)
            self.device.run(["rm", "-rf", "--", aside])
        elif self.device.is_dir(target):
            # An identical release is already there (same id, same bytes): keep it, drop the upload.
            self.device.run(["rm", "-rf", "--", temp])
        else:
            self.device.rename(temp, target)
        self.device.run(["touch", target])  # mtime = when it was last deployed (ordering, --keep)
        return target

    def switch(self, release_id: str) -> None:
        """Point ``current`` at ``releases/ID`` atomically: a new link, then ``mv -T`` over the old one."""
        temp_link = posixpath.join(self.base, f".current-{temp_stamp()}")
        self.device.run(["ln", "-s", f"releases/{release_id}", temp_link])
        try:
            self.device.run(["mv", "-T", temp_link, self.current_link])
        except RemoteCommandError:
            self.device.run(["rm", "-f", "--", temp_link], check=False)
            raise

    def prune(self, keep: int) -> List[str]:
        """Delete all but the ``keep`` most recently deployed releases (never the current one)."""
        releases = self.releases()
        doomed = [r.id for r in releases[max(keep, 1):] if not r.current]
        if doomed:
            self.device.run(["rm", "-rf", "--", *(self.release_dir(r) for r in doomed)])
        return doomed

    def remove(self, folder: str) -> None:
        """Delete a folder that failed its checks (best effort: the connection may be gone)."""
        try:
            self.device.run(["rm", "-rf", "--", folder], check=False)
        except (ConnectionLost, RemoteTimeout):
            pass

    def resolve(self, prefix: str) -> str:
        """The release id that ``prefix`` names uniquely; ReleaseError otherwise."""
        ids = [release.id for release in self.releases()]
        matches = [rid for rid in ids if rid.startswith(prefix)]
        if len(matches) != 1:
            known = ", ".join(ids) or "none"
            what = "no" if not matches else "more than one"
            raise ReleaseError(f"{self.device.label}: {what} release of {self.name} matches {prefix!r} (releases: {known})")
        return matches[0]


def list_models(device: Device, root: str) -> List[str]:
    """The model names deployed under ``root``."""
    return sorted(name for name in device.listdir(posixpath.join(root, "models")) if not name.startswith("."))
