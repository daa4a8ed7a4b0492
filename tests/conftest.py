"""Fixtures shared across test modules, found by pytest here instead of imported by each test file.

- ``sshd``, ``sshd_factory``: a real OpenSSH server on 127.0.0.1 (tests/sshd.py);
- ``edgeprune``, ``device_root``, ``model_dirs``: the deploy tests' CLI runner, remote root and MODEL_DIRs;
- ``bench_cli``, ``bench_models``, ``bench_device_root``, ``fake_vcgencmd``, ``hanging_python``: bench's.
"""

from tests.bench_fixtures import (bench_cli, bench_device_root, bench_models, fake_vcgencmd,  # noqa: F401
                                  hanging_python)
from tests.deploy_fixtures import device_root, edgeprune, model_dirs  # noqa: F401
from tests.sshd import sshd, sshd_factory  # noqa: F401
