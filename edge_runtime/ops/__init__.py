"""The native operators: one numpy function per ONNX op, registered by family.

An op function takes the node's inputs (``None`` for an omitted optional one) and its ``Attrs`` (the
attributes, plus the model's opset and the node's output count) and returns its output, or a tuple
when the op has several. ``OUTPUTS`` says how many outputs an op can produce (1 when absent); a
node that reads an output beyond that is refused at load, and so is one whose attributes fail its op's
``CHECKS`` entry (training modes, unsupported attribute values). Adding an op is one function and one line
in its family's ``OPS``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from edge_runtime.ops import elementwise, nn, reduce, resize, tensor
from edge_runtime.ops.base import Attrs, Inputs

OpFunction = Callable[[Inputs, Dict[str, Any]], Any]

OPS: Dict[str, OpFunction] = {**elementwise.OPS, **tensor.OPS, **reduce.OPS, **nn.OPS, **resize.OPS}
OUTPUTS: Dict[str, int] = {**tensor.OUTPUTS, **nn.OUTPUTS}
CHECKS: Dict[str, Callable[[Dict[str, Any]], None]] = {**tensor.CHECKS, **elementwise.CHECKS, **nn.CHECKS,
                                                       **resize.CHECKS}

__all__ = ["OPS", "OUTPUTS", "CHECKS", "Attrs", "Inputs", "OpFunction"]
