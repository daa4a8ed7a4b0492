#!/usr/bin/env bash
# Make a virtual environment (./.venv, or $EDGEPRUNE_VENV) and install edgeprune into it.
#
#   bash setup.sh            the project (what `edgeprune demo` needs)
#   bash setup.sh --test     the project and its test extras (what tests/run_all.sh needs)
#
# Why a venv: Debian 12 and Raspberry Pi OS refuse `pip install` outside one (PEP 668,
# "externally-managed-environment"). Debian also ships venv's pip bootstrap separately: as root, this
# script installs python3-venv with apt-get when it is missing; otherwise it says what to install.
# torch is pinned to 2.13.0 because an unpinned torch on x86-64 Linux is a multi-GB CUDA build; set
# EDGEPRUNE_TORCH_INDEX=https://download.pytorch.org/whl/cpu to take PyTorch's CPU-only wheel from its
# own index on a machine that reaches it. Running it again updates the venv in place.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${EDGEPRUNE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

make_venv() { "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; }
if [ ! -x "$VENV/bin/python" ] && ! make_venv; then
  rm -rf "$VENV"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing python3-venv (Debian ships venv's pip bootstrap separately)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    make_venv
  else
    echo "setup.sh: cannot make a virtual environment; install Debian's python3-venv (sudo apt-get install python3-venv)" >&2
    exit 2
  fi
fi

pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
torch_source=()
[ -n "${EDGEPRUNE_TORCH_INDEX:-}" ] && torch_source=(--index-url "$EDGEPRUNE_TORCH_INDEX")
"${pip[@]}" "${torch_source[@]}" torch==2.13.0
"${pip[@]}" -e ".$extras"
echo "setup.sh: edgeprune installed in $VENV (activate it with: . $VENV/bin/activate)" >&2
