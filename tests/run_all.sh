#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12 machine, then run the whole suite.
# This is the README's test command and what CI runs (.ci/run). Extra arguments go to pytest.
#
#   1. system parts: OpenSSH's sshd (deploy/bench tests run against a real one on 127.0.0.1);
#      qemu-user-static and Debian's arm64 Python for the emulated Pi come from
#      tests/emulated_pi/setup.sh, which the emulated-Pi test runs itself (cached between runs);
#   2. the project and its test extras in a virtual environment (setup.sh: ./.venv, torch pinned to the
#      CPU build; Debian refuses pip outside a venv), whose python3 then runs everything below;
#   3. the linter (ruff, rules in pyproject.toml), then the pytest suite;
#   4. the edge runtime's tests once more on Raspberry Pi OS's numpy 1.24 / scipy 1.10 (a pinned venv).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
  else
    echo "run_all.sh: /usr/sbin/sshd is missing; install openssh-server (the SSH tests need it)" >&2
  fi
fi

bash setup.sh --test
export PATH="$PWD/${EDGEPRUNE_VENV:-.venv}/bin:$PATH"   # so every `python3` below is the venv's

python3 -m ruff check --quiet . && echo "run_all.sh: ruff found nothing"

started=$SECONDS
python3 -m pytest -q --durations=15 "$@"   # the slowest tests, to keep `-m "not slow"` quick
echo "run_all.sh: main suite took $((SECONDS - started)) s"

started=$SECONDS
bash tests/pinned_runtime.sh
echo "run_all.sh: pinned-runtime suite took $((SECONDS - started)) s"
