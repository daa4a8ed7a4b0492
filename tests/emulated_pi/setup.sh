#!/usr/bin/env bash
# Build an "emulated Raspberry Pi": Raspberry Pi OS 64-bit's own Python (Debian 12 arm64 python3.11,
# python3-numpy 1.24, python3-scipy 1.10) unpacked into a sysroot and run through qemu-aarch64-static,
# plus an offline wheelhouse with onnxruntime's aarch64 wheel and its dependencies.
#
#   bash tests/emulated_pi/setup.sh            # idempotent; prints the sysroot's python wrapper path
#
# Cached under $EDGEPRUNE_EMUPI_CACHE (default /var/cache/edgeprune-emupi). Needs root (apt-get).
# binfmt_misc is not available in CI containers, so nothing registers qemu with the kernel: a small
# wrapper script (SYSROOT/usr/bin/python3-qemu) execs qemu with `-L SYSROOT` (an overlay of absolute
# paths, not a chroot) and `-0 "$0"`, so a venv made from it points back at the wrapper.
set -euo pipefail

CACHE="${EDGEPRUNE_EMUPI_CACHE:-/var/cache/edgeprune-emupi}"
SYSROOT="$CACHE/sysroot"
DEBS="$CACHE/debs"
WHEELHOUSE="$CACHE/wheelhouse"
STAMP="$CACHE/.complete-v1"
# onnxruntime's aarch64 manylinux wheel; 1.19.x imports with Debian 12's numpy 1.24 (built for the numpy 1.x ABI).
ORT_VERSION="${EDGEPRUNE_EMUPI_ORT:-1.19.2}"

if [ -f "$STAMP" ]; then
  echo "$SYSROOT/usr/bin/python3-qemu"
  exit 0
fi
mkdir -p "$CACHE" "$DEBS" "$WHEELHOUSE"

if ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
fi
apt-get update -qq

# The arm64 dependency closure of python3.11, python3.11-venv, python3-numpy and python3-scipy (first
# choice of every alternative), as resolve_debs.py wrote it to packages.txt; unpacked, never installed.
closure=$(grep -v '^#' "$(dirname "$0")/packages.txt")
(cd "$DEBS" && { apt-get download -qq $closure 2>/dev/null || for pkg in $closure; do
   ls "${pkg%%:*}"_*.deb >/dev/null 2>&1 || apt-get download -qq "$pkg" 2>/dev/null || apt-get download -qq "${pkg%%:*}"
 done; })
rm -rf "$SYSROOT.partial" && mkdir -p "$SYSROOT.partial"
for deb in "$DEBS"/*.deb; do dpkg -x "$deb" "$SYSROOT.partial"; done

# dpkg -x runs no maintainer scripts: recreate the alternatives numpy/scipy need (BLAS/LAPACK).
LIBDIR="$SYSROOT.partial/usr/lib/aarch64-linux-gnu"
for lib in libblas.so.3 liblapack.so.3; do
  for candidate in openblas-pthread/$lib blas/$lib lapack/$lib; do
    if [ ! -e "$LIBDIR/$lib" ] && [ -e "$LIBDIR/$candidate" ]; then ln -sf "$candidate" "$LIBDIR/$lib"; fi
  done
done
# onnxruntime's CPU detection reads /proc/cpuinfo; qemu looks in the sysroot first. A Pi 4's:
mkdir -p "$SYSROOT.partial/proc"
{
  for cpu in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$cpu"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
  done
  printf 'Revision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n'
} > "$SYSROOT.partial/proc/cpuinfo"

cat > "$SYSROOT.partial/usr/bin/python3-qemu" <<WRAPPER
#!/bin/sh
# Run the sysroot's aarch64 python3.11 under qemu. -0 "\$0" makes sys.executable this wrapper (or the
# venv link that points at it), so venvs created from it run through qemu too.
export QEMU_CPU=cortex-a72
exec qemu-aarch64-static -L "$SYSROOT" -0 "\$0" "$SYSROOT/usr/bin/python3.11" "\$@"
WRAPPER
chmod 755 "$SYSROOT.partial/usr/bin/python3-qemu"
rm -rf "$SYSROOT" && mv "$SYSROOT.partial" "$SYSROOT"

# The offline wheelhouse: onnxruntime for the device, and its dependencies, never numpy (the device's own
# python3-numpy 1.24 serves).
PIP_DL="python3 -m pip download -q --dest $WHEELHOUSE --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --only-binary=:all: --python-version 3.11 --implementation cp"
# Resolve the whole set (pip picks versions that fit together), then drop numpy: the device has its own.
$PIP_DL "onnxruntime==$ORT_VERSION"
rm -f "$WHEELHOUSE"/numpy-*.whl
touch "$STAMP"
echo "$SYSROOT/usr/bin/python3-qemu"
