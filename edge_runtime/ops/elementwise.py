"""Element-wise ops: activations, arithmetic, comparisons and logic, with numpy broadcasting (which
is ONNX's multidirectional broadcasting). Results keep the input's dtype, as ONNX defines them."""

from __future__ import annotations

from typing import Any, Callable, Dict

import numpy as np
from scipy import special

from edge_runtime.errors import UnsupportedOpError
from edge_runtime.ops.base import Inputs, opset_of, optional, same_dtype


def _unary(fn: Callable[[np.ndarray], Any]) -> Callable[[Inputs, Dict[str, Any]], np.ndarray]:
    return lambda inputs, attrs: same_dtype(fn(inputs[0]), inputs[0])


def _binary(fn: Callable[[np.ndarray, np.ndarray], Any]) -> Callable[[Inputs, Dict[str, Any]], np.ndarray]:
    return lambda inputs, attrs: same_dtype(fn(inputs[0], inputs[1]), inputs[0])


def _compare(fn: Callable[[np.ndarray, np.ndarray], Any]) -> Callable[[Inputs, Dict[str, Any]], np.ndarray]:
    return lambda inputs, attrs: np.asarray(fn(inputs[0], inputs[1]), dtype=np.bool_)


def _variadic(fn: Callable[[np.ndarray, np.ndarray], Any]) -> Callable[[Inputs, Dict[str, Any]], np.ndarray]:
    def run(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
        result = inputs[0]
        for x in inputs[1:]:
            result = fn(result, x)
        return same_dtype(result, inputs[0])
    return run


def _f(attrs: Dict[str, Any], name: str, default: float) -> float:
    return float(attrs.get(name, default))


def div(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """Integer division truncates toward zero (C semantics, as onnxruntime computes it)."""
    a, b = inputs[0], inputs[1]
    if a.dtype.kind not in "iu":
        return same_dtype(a / b, a)
    quotient = np.floor_divide(a, b)
    fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
    return same_dtype(quotient + fix, a)


def mod(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """fmod=1: C's fmod (sign of the dividend); fmod=0: Python's mod (sign of the divisor)."""
    a, b = inputs[0], inputs[1]
    return same_dtype(np.fmod(a, b) if attrs.get("fmod", 0) else np.mod(a, b), a)


def pow_(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    base, exponent = inputs[0], inputs[1]
    if base.dtype.kind in "iu" and exponent.dtype.kind in "iu":
        return same_dtype(np.power(base.astype(np.int64), exponent.astype(np.int64)), base)
    return same_dtype(np.power(base.astype(np.float64), exponent.astype(np.float64)), base) \
        if base.dtype.kind in "iu" else same_dtype(np.power(base, exponent.astype(base.dtype)), base)


def clip(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    low, high = optional(inputs, 1), optional(inputs, 2)
    low = attrs.get("min") if low is None else low
    high = attrs.get("max") if high is None else high
    if low is None and high is None:  # ONNX allows it (identity); numpy before 2.1 refuses np.clip(x, None, None)
        return x
    result = np.maximum(x, np.asarray(low, dtype=x.dtype)) if low is not None else None
    if high is not None:  # into the first result's buffer: one allocation (ReLU6 runs on big activations)
        result = np.minimum(x if result is None else result, np.asarray(high, dtype=x.dtype), out=result)
    return same_dtype(result, x)


def check_gelu(attrs: Dict[str, Any]) -> None:
    if attrs.get("approximate", "none") not in ("none", "tanh"):
        raise UnsupportedOpError("Gelu", f"approximate={attrs['approximate']!r}")


def gelu(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    check_gelu(attrs)
    if attrs.get("approximate", "none") == "tanh":
        return same_dtype(0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))), x)
    return same_dtype(0.5 * x * (1 + special.erf(x / np.sqrt(2))), x)


def prelu(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """Before opset 7 a 1-D slope of one value per channel applies along axis 1 (what torch exported as
    PReLU(num_parameters=C)); from opset 7 the slope broadcasts numpy-style."""
    x, slope = inputs[0], inputs[1]
    if opset_of(attrs) < 7 and slope.ndim == 1 and slope.size > 1 and x.ndim > 2 and x.shape[1] == slope.size:
        slope = slope.reshape(-1, *([1] * (x.ndim - 2)))
    return same_dtype(np.where(x < 0, x * slope, x), x)


def where(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    return np.where(inputs[0], inputs[1], inputs[2]).astype(inputs[1].dtype, copy=False)


def is_inf(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    positive, negative = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    return np.isinf(x) & ((x > 0) if positive and not negative else (x < 0) if negative and not positive
                          else np.bool_(positive or negative))


def shrink(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    bias, lambd = _f(attrs, "bias", 0.0), _f(attrs, "lambd", 0.5)
    return same_dtype(np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0)), x)


def bit_shift(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    direction = attrs["direction"]
    if direction not in ("LEFT", "RIGHT"):
        raise UnsupportedOpError("BitShift", f"direction={direction!r}")
    fn = np.left_shift if direction == "LEFT" else np.right_shift
    return same_dtype(fn(inputs[0], inputs[1]), inputs[0])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return special.expit(x)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0, x)


OPS: Dict[str, Callable[[Inputs, Dict[str, Any]], np.ndarray]] = {
    "Abs": _unary(np.abs),
    "Neg": _unary(np.negative),
    "Sign": _unary(np.sign),
    "Exp": _unary(np.exp),
    "Log": _unary(np.log),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
    "Floor": _unary(np.floor),
    "Ceil": _unary(np.ceil),
    "Round": _unary(np.round),  # half to even, as ONNX
    "Sin": _unary(np.sin),
    "Cos": _unary(np.cos),
    "Tan": _unary(np.tan),
    "Asin": _unary(np.arcsin),
    "Acos": _unary(np.arccos),
    "Atan": _unary(np.arctan),
    "Sinh": _unary(np.sinh),
    "Cosh": _unary(np.cosh),
    "Asinh": _unary(np.arcsinh),
    "Acosh": _unary(np.arccosh),
    "Atanh": _unary(np.arctanh),
    "Tanh": _unary(np.tanh),
    "Erf": _unary(special.erf),
    "Sigmoid": _unary(_sigmoid),
    "Softplus": _unary(_softplus),
    "Softsign": _unary(lambda x: x / (1 + np.abs(x))),
    "Mish": _unary(lambda x: x * np.tanh(_softplus(x))),
    "Relu": _unary(lambda x: np.maximum(x, 0)),
    "LeakyRelu": lambda i, a: same_dtype(np.where(i[0] < 0, i[0] * _f(a, "alpha", 0.01), i[0]), i[0]),
    "Elu": lambda i, a: same_dtype(np.where(i[0] < 0, _f(a, "alpha", 1.0) * np.expm1(i[0]), i[0]), i[0]),
    "Selu": lambda i, a: same_dtype(_f(a, "gamma", 1.0507009873554805) * np.where(
        i[0] <= 0, _f(a, "alpha", 1.6732632423543772) * np.expm1(i[0]), i[0]), i[0]),
    "Celu": lambda i, a: same_dtype(np.maximum(i[0], 0) + np.minimum(
        0, _f(a, "alpha", 1.0) * np.expm1(i[0] / _f(a, "alpha", 1.0))), i[0]),
    "ThresholdedRelu": lambda i, a: same_dtype(np.where(i[0] > _f(a, "alpha", 1.0), i[0], 0), i[0]),
    "HardSigmoid": lambda i, a: same_dtype(np.clip(_f(a, "alpha", 0.2) * i[0] + _f(a, "beta", 0.5), 0, 1), i[0]),
    "HardSwish": _unary(lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
    "Gelu": gelu,
    "PRelu": prelu,
    "Clip": clip,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": div,
    "Mod": mod,
    "Pow": pow_,
    "Sum": _variadic(np.add),
    "Max": _variadic(np.maximum),
    "Min": _variadic(np.minimum),
    "Mean": lambda i, a: same_dtype(_variadic(np.add)(i, a) / len(i), i[0]),
    "Equal": _compare(np.equal),
    "Less": _compare(np.less),
    "LessOrEqual": _compare(np.less_equal),
    "Greater": _compare(np.greater),
    "GreaterOrEqual": _compare(np.greater_equal),
    "And": _compare(np.logical_and),
    "Or": _compare(np.logical_or),
    "Xor": _compare(np.logical_xor),
    "Not": _unary(np.logical_not),
    "IsNaN": lambda i, a: np.isnan(i[0]),
    "IsInf": is_inf,
    "Shrink": shrink,
    "BitShift": bit_shift,
    "BitwiseNot": _unary(np.invert),
    "BitwiseAnd": _binary(np.bitwise_and),
    "BitwiseOr": _binary(np.bitwise_or),
    "BitwiseXor": _binary(np.bitwise_xor),
    "Where": where,
}
CHECKS: Dict[str, Callable[[Dict[str, Any]], None]] = {"Gelu": check_gelu}
