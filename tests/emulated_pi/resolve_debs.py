"""Print the arm64 packages a set of Debian packages needs, taking the first choice of every `a | b`.

`apt-cache depends --recurse` follows every alternative (all of clang, every BLAS); this follows one,
as apt would, so the emulated Pi's sysroot stays small. Packages named in SKIP are not needed to run
Python (dpkg, perl, debconf, ...). Usage: python3 resolve_debs.py PKG [PKG ...]
"""

import subprocess
import sys

SKIP = {"debconf", "cdebconf", "dpkg", "perl-base", "coreutils", "tar", "base-files", "bash", "debianutils",
        "install-info", "libc-bin", "lsb-base", "sysvinit-utils", "init-system-helpers", "tzdata",
        "readline-common", "sensible-utils", "ca-certificates", "openssl", "libdebian-installer4",
        # scipy's Debian package depends on pythran (and so on gcc, g++, boost) only to build extensions.
        "python3-pythran", "python3-dev", "python3-all-dev", "libpython3-dev", "python3.11-dev"}


def depends(packages: list) -> dict:
    """Each package's dependency groups (one list of alternatives per Depends line); one apt-cache call."""
    out = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
                          "--no-breaks", "--no-replaces", "--no-enhances", *packages],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    found: dict = {}
    groups = current = None
    last_name = None
    for line in out:
        if not line.startswith(" "):  # a new package's section
            groups, current = found.setdefault(line.strip(), []), []
            continue
        stripped = line.strip()
        if line.startswith("    "):  # a provider of the virtual package just named
            if last_name is not None and last_name.startswith("<"):
                last_group = groups[-1] if groups and last_name in groups[-1] else current
                last_group.append(stripped)
            continue
        is_or = stripped.startswith("|")
        kind, _, name = stripped.lstrip("|").partition(": ")
        if kind not in ("Depends", "PreDepends"):
            last_name = None
            continue
        last_name = name
        current.append(name)
        if not is_or:
            groups.append(current)
            current = []
    return {package: [[n for n in group if not n.startswith("<")] for group in groups]
            for package, groups in found.items()}


def main(roots: list) -> None:
    seen, level = set(), [f"{root}:arm64" for root in roots]
    while level:
        level = [p for p in dict.fromkeys(level) if p not in seen and p.split(":")[0] not in SKIP]
        seen.update(level)
        following = []
        for package, groups in depends(level).items() if level else []:
            for group in groups:
                names = [name if ":" in name else f"{name}:arm64" for name in group]
                names = [name for name in names if not name.endswith(":any")] or [n.replace(":any", ":arm64") for n in names]
                if names and not any(name in seen or name in following for name in names):
                    following.append(names[0])
        level = following
    print("\n".join(sorted(seen)))


if __name__ == "__main__":
    main(sys.argv[1:])
