"""Child process of the MODEL_DIR fuzz test: runs ``edge-runtime check`` in-process on each folder it is
sent, under an address-space limit, and reports how each ended.

Protocol (one JSON object per line): stdin ``{"dir": PATH, "kernels": K}`` (PATH: a MODEL_DIR or a plain
.onnx file); stdout
``{"rc": N, "stderr": TEXT}`` or ``{"exception": "Type: message"}`` when something escaped the CLI's
error handling (a bug: the fuzz test fails on it). A crash (SIGSEGV, abort) shows as this process
dying; the parent restarts it. On EOF it prints ``{"peak_rss_mb": VmHWM}``.

    python -m tests.fuzz_worker ADDRESS_SPACE_BYTES
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import traceback


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _one(request: dict) -> dict:
    from edge_runtime.cli import main

    stdout = io.StringIO()
    with tempfile.TemporaryFile("w+") as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)  # file descriptor 2: onnxruntime's C++ logger writes there too
        try:
            with contextlib.redirect_stdout(stdout):
                rc = main(["check", request["dir"], "--kernels", request["kernels"], "--threads", "1"])
        except BaseException as error:  # anything escaping main() would be a traceback for the user
            return {"exception": f"{type(error).__name__}: {error}"[:500],
                    "traceback": traceback.format_exc()[-2000:]}
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return {"rc": rc, "stderr": captured.read()[-1000:]}


def main() -> None:
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import edge_runtime.cli  # noqa: F401  (import once, before the first request)
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    from edge_runtime import plan

    measure = plan.compare
    # `auto` retunes whenever a fuzzed plans.json is refused: the engines are still all run, but timed
    # in one short round (robustness is under test here, not which engine wins)
    plan.compare = lambda candidates, *args, **kwargs: measure(candidates, rounds=1, round_seconds=0.0005,
                                                                statistic=kwargs.get("statistic", "min"))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_one(json.loads(line))), flush=True)
    print(json.dumps({"peak_rss_mb": round(_peak_rss_mb(), 1)}), flush=True)


if __name__ == "__main__":
    main()
