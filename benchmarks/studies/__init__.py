"""Research scripts: each prints tables and writes JSON for a question the project asked (methods
compared, runtime vs onnxruntime, structured pruning, int8, real-model zoo, distributed training).

Run from a checkout (``python3 benchmarks/studies/NAME.py --help``); they are not installed with the
package. The ``edgeprune bench`` harness lives one folder up; the scripts it copies to a device are
listed in ``benchmarks.device_facts.DEVICE_SCRIPTS``.
"""
