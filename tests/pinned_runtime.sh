#!/usr/bin/env bash
# The edge runtime's torch-free tests, once more on Raspberry Pi OS 64-bit's own package versions
# (Python 3.11, numpy 1.24, scipy 1.10) with onnxruntime 1.19.2, the last release built against
# numpy 1.x (and one that cannot read external sparse indices, which the export format avoids).
#
# The MODEL_DIRs are built first with the main environment's torch (python3 -m tests.runtime_fixtures);
# the pinned venv has no torch, compressor or onnx to import, so these runs also prove edge_runtime
# needs none of them. Usage: bash tests/pinned_runtime.sh [extra pytest args]. Takes ~1-2 minutes
# (the venv is reused from $EDGEPRUNE_PINNED_VENV when it already exists).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON311=${PYTHON311:-$(command -v python3.11 || command -v python3)}
VENV=${EDGEPRUNE_PINNED_VENV:-${TMPDIR:-/tmp}/edgeprune-pinned-runtime-venv}
PINS=("numpy==1.24.*" "scipy==1.10.*" "onnxruntime==1.19.2" "pytest>=7")

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON311" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
"$VENV/bin/python" - <<'PY'
import numpy, scipy, onnxruntime, sys
assert sys.version_info[:2] == (3, 11), sys.version
assert numpy.__version__.startswith("1.24.") and scipy.__version__.startswith("1.10."), (numpy.__version__, scipy.__version__)
print(f"pinned venv: Python {sys.version.split()[0]}, numpy {numpy.__version__}, scipy {scipy.__version__}, "
      f"onnxruntime {onnxruntime.__version__}")
PY

FIXTURES=$(mktemp -d "${TMPDIR:-/tmp}/edgeprune-pinned-fixtures-XXXXXX")
trap 'rm -rf "$FIXTURES"' EXIT
python3 -m tests.runtime_fixtures "$FIXTURES" >/dev/null

# The repo on PYTHONPATH gives the venv edge_runtime and the tests (not an install: the project's
# dependencies include torch). Its other packages are there too but cannot import without torch.
EDGEPRUNE_RUNTIME_FIXTURES="$FIXTURES" PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_runtime_correctness.py tests/test_runtime_errors.py tests/test_runtime_cli.py \
  tests/test_runtime_no_torch.py tests/test_runtime_ops.py tests/test_conformance_onnx.py tests/test_runtime_tuner.py tests/test_runtime_variants.py tests/test_runtime_compact.py "$@"
