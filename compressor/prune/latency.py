"""Predicted latency of a network at any channel widths, from a measured table (the planning side).

``LatencyModel`` knows the template's Conv/Linear layers and how each one's input and output widths
follow the coupled channel groups (Torch-Pruning's dependency graph); with a ``LatencyTable``
(``edge_runtime.layer_timing``: the format, and the measuring that runs on the device) it predicts the
milliseconds of any plan: ``call_ms + sum(layer ms) + node_ms * nodes``, the table's fixed cost of one
call and of every node the network runs besides its layers (counted in the exported ONNX graph: fewer
when blocks are removed). ``python3 -m compressor.latency_shapes --model NAME --shapes-out FILE`` lists the
shapes a model needs, to measure on a device; ``--out FILE`` measures them here.

Where the table and the network disagree (a layer alone pays layout changes a chain of layers shares),
the planner times whole candidate networks through a ``LatencySource``: ``LocalLatency`` on this
machine, or a remote one the ``edgeprune`` front hands over (``--latency-on``).
"""

from __future__ import annotations

import inspect
import io
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Set, Tuple

import torch
from torch import nn

from compressor.config import DEFAULT_CHANNEL_MULTIPLE, DEFAULT_MIN_CHANNELS
from compressor.errors import ConfigError
from compressor.prune.channels import PRUNABLE, Group, _full_group, _is_depthwise, trace
from compressor.prune.examples import call_example, Example, move_example
from edge_runtime import layer_timing
from edge_runtime.layer_timing import LatencyTable, LatencyTableError, LayerShape, check_for_planning

RUN_DIR_NAME = "latency_table.json"  # the table a run planned from, kept so --resume plans the same
MAX_SHAPES = 5000  # a table this large takes minutes to measure: the multiple is too fine for this model
LAYER_OPS = ("Conv", "Gemm", "MatMul")  # the nodes a table times; every other node costs node_ms
FREE_OPS = ("Identity", "Constant", "Flatten", "Reshape", "Squeeze", "Unsqueeze")  # no work in onnxruntime


class LatencySource(Protocol):
    """Where latency is measured: the machine the model will run on (``LocalLatency``: this one)."""

    def describe(self) -> str:
        """One line naming the machine, for messages and metrics."""

    def table(self, shapes: Sequence[LayerShape], engine: str, threads: int) -> LatencyTable:
        """A table of ``shapes`` timed there with ``engine`` ("ort" or "ort-int8") and ``threads``."""

    def time_networks(self, models: Sequence[bytes], threads: int) -> List[float]:
        """p50 ms of whole serialized ONNX models there (already quantized when int8), interleaved."""


class LocalLatency:
    """Measures on this machine, in-process (``edge_runtime.layer_timing``: one-layer models of either
    engine are written there; whole int8 networks are quantized by the planner, ``quantize_qdq``)."""

    def __init__(self, rounds: int = 5, runs: int = 20) -> None:
        self.rounds, self.runs = rounds, runs

    def describe(self) -> str:
        return f"this machine ({layer_timing.measured_on()})"

    def table(self, shapes: Sequence[LayerShape], engine: str, threads: int) -> LatencyTable:
        return layer_timing.measure(shapes, threads, self.rounds, self.runs, engine)

    def time_networks(self, models: Sequence[bytes], threads: int) -> List[float]:
        return layer_timing.time_networks(models, threads, self.rounds, self.runs)


SESSIONS = 1          # sessions a candidate network is timed in while the last level searches
CONFIRM_SESSIONS = 3  # ... and the network it ships (its recorded speed-up), and every network the study measures


def side_by_side(source: LatencySource, dense: bytes, candidate: bytes, threads: int,
                 sessions: int = CONFIRM_SESSIONS) -> Tuple[float, float]:
    """(dense ms, candidate ms): the two networks timed side by side (``source.time_networks``: rounds
    interleaved, the typical run: ``layer_timing.NETWORK_QUANTILE`` of all) in each of ``sessions``
    separate sessions; the pair whose ratio is the median of them. One session can be off for its whole
    life (where onnxruntime's buffers fell, a burst of load); the median pair is not. The planner's measured
    speed-up (``measured_speedup`` and, once corrected by it, ``predicted_speedup`` in metrics.json) and
    ``benchmarks/studies/prune_to_device.py``'s are both this: the ratio a user timing both files sees."""
    pairs = []
    for _ in range(max(1, sessions)):
        times = source.time_networks([dense, candidate], threads)
        if len(times) != 2 or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t < 1e7
                                      for t in times):
            raise LatencyTableError(f"{source.describe()} returned no usable network times ({str(times)[:80]})")
        pairs.append((float(times[0]), float(times[1])))
    pairs.sort(key=lambda pair: pair[0] / pair[1])
    return pairs[len(pairs) // 2]


def quantize_qdq(model: bytes, batches: int = 8) -> bytes:
    """``model`` with static QDQ int8 (per-channel symmetric int8 weights, uint8 activations: what
    ``export --quantize int8`` ships), calibrated on random inputs (latency does not depend on them)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = [layer_timing._random_feed(session) for _ in range(batches)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    with tempfile.TemporaryDirectory(prefix="edgeprune-int8-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(model)  # our own fresh temporary folder: nothing else can be there
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        extra_options={"WeightSymmetric": True})
        return onnx.load(str(target)).SerializeToString()


def network_onnx(model: nn.Module, example: Example) -> bytes:
    """``model`` exported to ONNX (TorchScript exporter, eval mode, BatchNorm folded) for timing, called
    on ``example`` as a batch gives it (``call_example``): a tensor is the graph's input ``input``, a
    tuple's tensors ``input_0``, ``input_1``, ... and a dict's its keys (keyword arguments). Shapes stay
    the example's (batch 1, as the device times them)."""
    args, kwargs, names = export_inputs(model, example)
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, buffer, kwargs=kwargs, dynamo=False, opset_version=17,
                              do_constant_folding=True, input_names=names)
    finally:
        model.train(was_training)
    return buffer.getvalue()


def export_inputs(model: nn.Module, example: Example) -> Tuple[Tuple[torch.Tensor, ...],
                                                               Optional[Dict[str, torch.Tensor]], List[str]]:
    """``torch.onnx.export``'s positional args, keyword args and graph input names for ``example``
    (tensor, tuple or dict: see ``compressor.prune.examples``), on the CPU where the export runs."""
    example = move_example(example, torch.device("cpu"))
    if isinstance(example, torch.Tensor):
        return (example,), None, ["input"]
    if isinstance(example, Mapping):
        # the exporter's graph inputs follow forward's parameters, not the dict: names must too
        order = {name: i for i, name in enumerate(inspect.signature(model.forward).parameters)}
        keys = sorted(example, key=lambda key: order.get(key, len(order)))  # stable: **kwargs keep theirs
        return (), {key: example[key] for key in keys}, keys
    return tuple(example), None, [f"input_{i}" for i in range(len(example))]


def count_nodes(model: bytes) -> int:
    """Nodes of an exported graph that a table does not time but onnxruntime runs (activations, adds,
    pooling): what ``node_ms`` is paid for. Layers are in the table; Identity and reshapes cost nothing."""
    import onnx

    graph = onnx.load_from_string(model).graph
    return sum(node.op_type not in LAYER_OPS + FREE_OPS for node in graph.node)


def step_of(g: Group, multiple: int) -> int:
    """Units per rounding step of ``g`` (a unit is one channel in every block of a grouped conv)."""
    return max(1, multiple // math.gcd(multiple, g.blocks))


def ladder(g: Group, have_units: int, multiple: int, narrowest: int) -> List[int]:
    """The unit counts ``g`` may keep, widest first: what ``Ranking.keep_units`` can round to."""
    if g.blocks == 1 and narrowest != multiple:
        if have_units <= narrowest:
            return [have_units]
        allowed = {narrowest, have_units} | set(range(multiple, have_units + 1, multiple))
        return sorted((w for w in allowed if narrowest <= w <= have_units), reverse=True)
    step = step_of(g, multiple)
    if have_units <= step:
        return [have_units]
    return sorted({have_units} | set(range(step, have_units + 1, step)), reverse=True)


class _Layer:
    """One Conv/Linear and how its widths follow the groups: ``width = dense - sum(ratio * removed_g)``
    (no ratios: a layer no group touches, e.g. an ``--exclude``d one, counted at its dense shape)."""

    def __init__(self, name: str, dense: LayerShape, depthwise: bool) -> None:
        self.name, self.dense, self.depthwise = name, dense, depthwise
        self.inputs: Dict[int, float] = {}  # group index -> input features per removed channel
        self.outputs: Dict[int, float] = {}

    def shape(self, removed: Sequence[int]) -> LayerShape:
        """The layer's shape with ``removed[i]`` channels gone from group ``i``."""
        cin = self.dense.cin - round(sum(r * removed[i] for i, r in self.inputs.items()))
        cout = self.dense.cout - round(sum(r * removed[i] for i, r in self.outputs.items()))
        return self.at(cin, cout)

    def at(self, cin: int, cout: int) -> LayerShape:
        d = self.dense
        if self.depthwise:  # one filter per channel: inputs, outputs and groups shrink together
            cin = cout
        return LayerShape(d.op, cin, cout, d.spatial, d.kernel, d.stride, d.padding, d.dilation,
                          cout if self.depthwise else d.groups)


class LatencyModel:
    """Predicted onnxruntime latency of the template shrunk to any group widths (see the module doc)."""

    def __init__(self, template: nn.Module, example: Example, groups: Sequence[Group], multiple: int,
                 min_channels: Optional[int] = None) -> None:
        self.groups, self.multiple = list(groups), multiple
        self.narrowest = min_channels or multiple
        self.layers = _layers(template, example, self.groups)
        self.table: Optional[LatencyTable] = None
        self.touching: List[List[_Layer]] = [[l for l in self.layers if i in l.inputs or i in l.outputs]
                                             for i in range(len(self.groups))]
        self._template, self._example = template, example
        self._nodes: Optional[int] = None

    @property
    def nodes(self) -> int:
        """Nodes besides the layers in the template's graph (channel pruning never changes it; a
        network with blocks removed counts its own with ``count_nodes`` and passes ``nodes=``)."""
        if self._nodes is None:
            self._nodes = count_nodes(network_onnx(self._template, self._example))
        return self._nodes

    def shapes_needed(self) -> List[LayerShape]:
        """Every layer shape any allowed combination of group widths produces (the table to measure)."""
        ladders = [[u * g.blocks for u in ladder(g, g.size // g.blocks, self.multiple, self.narrowest)]
                   for g in self.groups]
        shapes: Dict[str, LayerShape] = {}
        for layer in self.layers:
            ins = _removals(layer.inputs, ladders, self.groups)
            outs = _removals(layer.outputs, ladders, self.groups)
            if len(ins) * len(outs) > MAX_SHAPES:
                raise ConfigError(f"--allocate latency: layer {layer.name!r} alone has {len(ins) * len(outs)} "
                                  f"width combinations to measure; raise --channel-multiple")
            for cut_in in ins:
                for cut_out in outs:
                    shape = layer.at(layer.dense.cin - cut_in, layer.dense.cout - cut_out)
                    shapes.setdefault(shape.key(), shape)
            if len(shapes) > MAX_SHAPES:
                raise ConfigError(f"--allocate latency: more than {MAX_SHAPES} layer shapes to measure; "
                                  f"raise --channel-multiple")
        return list(shapes.values())

    def use(self, table: LatencyTable, source: str) -> None:
        """Predict with ``table``; ``LatencyTableError`` naming what it lacks for this model."""
        missing = table.missing(self.shapes_needed())
        if missing:
            raise LatencyTableError(
                f"{source} lacks {len(missing)} layer shape(s) this run needs (e.g. {missing[0]!r}); measure it "
                f"for this model and multiple: python3 -m compressor.latency_shapes --model ... --out FILE")
        # flat or inverted: refused (one line); milder doubts: one warning line each, then planned with
        for warning in check_for_planning(table, self.shapes_needed(), source):
            logging.getLogger("compressor").warning(warning)
        self.table = table

    def layer_ms(self, layer: _Layer, removed: Sequence[int]) -> float:
        assert self.table is not None, "LatencyModel.use(table) first"
        return self.table.ms[layer.shape(removed).key()]

    def layers_ms(self, widths: Mapping[str, int]) -> float:
        """Milliseconds of the Conv/Linear layers alone with each group at ``widths[root]`` channels."""
        removed = [g.size - widths[g.root] for g in self.groups]
        return sum(self.layer_ms(layer, removed) for layer in self.layers)

    def predict(self, widths: Mapping[str, int], nodes: Optional[int] = None) -> float:
        """Predicted milliseconds of the whole network at ``widths``: one call's fixed cost, the layers,
        and ``node_ms`` for every other node (``nodes``: default the template's count)."""
        assert self.table is not None, "LatencyModel.use(table) first"
        count = self.nodes if nodes is None and self.table.node_ms else (nodes or 0)
        return self.table.call_ms + self.layers_ms(widths) + self.table.node_ms * count


def _removals(ratios: Mapping[int, float], ladders: Sequence[Sequence[int]], groups: Sequence[Group]) -> Set[int]:
    """Every number of features one side of a layer can lose: sums over the feeding groups' ladders."""
    totals = {0}
    for index, ratio in ratios.items():
        size = groups[index].size
        totals = {t + round(ratio * (size - w)) for t in totals for w in ladders[index]}
    return totals


def _layers(template: nn.Module, example: Example, groups: Sequence[Group]) -> List[_Layer]:
    """The template's Conv/Linear layers on the forward path, with their dense shapes and ratios."""
    graph = trace(template, example)
    modules = dict(template.named_modules())
    spatial = _input_sizes(template, example)
    layers: Dict[str, _Layer] = {}
    for index, g in enumerate(groups):
        for item in _full_group(graph, modules[g.root], range(g.size)):
            module = item.dep.target.module
            if not isinstance(module, PRUNABLE):
                continue
            name = next(n for n, m in modules.items() if m is module)
            layer = layers.setdefault(name, _Layer(name, _dense_shape(module, spatial[name]), _is_depthwise(module)))
            side = layer.outputs if graph.is_out_channel_pruning_fn(item.dep.handler) else layer.inputs
            side[index] = side.get(index, 0.0) + len(item.idxs) / g.size
    for name, module in modules.items():  # the layers no group touches cost the same in every plan
        if isinstance(module, PRUNABLE) and name in spatial and name not in layers:
            layers[name] = _Layer(name, _dense_shape(module, spatial[name]), False)
    return [layers[n] for n in modules if n in layers]


def _input_sizes(model: nn.Module, example: Example) -> Dict[str, Tuple[int, ...]]:
    """Each Conv/Linear's input size after the channel axis (Linear: the dims before features)."""
    sizes: Dict[str, Tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            def record(mod, inputs, _out, name=name):
                shape = tuple(inputs[0].shape)
                sizes[name] = shape[1:-1] if isinstance(mod, nn.Linear) else shape[2:]
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_example(model, example)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return sizes


def _dense_shape(module: nn.Module, spatial: Tuple[int, ...]) -> LayerShape:
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.in_features, module.out_features, tuple(spatial))
    padding = module.padding
    if isinstance(padding, str):  # "same"/"valid": the explicit pads onnxruntime would use
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return LayerShape("conv", module.in_channels, module.out_channels, tuple(spatial), tuple(module.kernel_size),
                      tuple(module.stride), tuple(padding) * 2, tuple(module.dilation), module.groups)


# --- the default rounding ---------------------------------------------------------------------------
# With no --channel-multiple, kept widths are multiples of 16, with 8 as the narrowest; the global ranking
# (blind to time) allows 8 only in groups 16 wide (channels.floor_width), a table's allocations everywhere. Measured on resnet20 (onnxruntime, batch 1, 1 thread, 128x128, same run): multiples
# of 8 picked 8/16/24/40/48 at 57% MACs removed and ran at efficiency 0.60 (speed-up / MAC ratio), multiples
# of 16 picked 16/32 at 50% and ran at 0.82; Torch-Pruning's round_to 16 0.83. At 70% removed, 8 allowed in
# any group cut a 32-wide group to 8 and ran at 0.68 (MobileNetV2-shaped: 0.83); 8 only in 16-wide groups
# ran at 0.88 (0.89) at the same MACs: one-layer timings show why, a conv with 8 outputs runs at 15-20 GMAC/s
# against 26-45 with 16 or more (benchmarks/studies/default_rounding.py). onnxruntime's x86 kernels block 8
# or 16 floats; a Pi's NEON blocks 4, so every multiple of 16 is whole blocks there too. A timed table of
# one-layer models or of conv chains did not reproduce the slow 24/40/48 (a layer alone pays layout changes
# a network shares), so the default is this fixed rule, identical everywhere (runs repeat), and --allocate
# global-table or latency with --latency-on plans from the device's own times instead.
DEFAULT_ROUNDING = {"multiple": DEFAULT_CHANNEL_MULTIPLE, "min_channels": DEFAULT_MIN_CHANNELS}
# With --quantize int8 planned, multiples of 16 with 16 as the narrowest: onnxruntime's int8 conv on x86
# without VNNI (u8s8 kernels) runs 8 channels at 7-14 GMAC/s against 30-78 at 16..64 (resnet20's 3x3 convs,
# benchmarks/studies/int8_widths.py, thread CPU time): at 32x32 and below an 8-wide layer is no faster than a
# 16-wide one, at 64-128 px 15-20% faster for a quarter of the MACs; 16 -> 8 removes MACs, not int8 time.
# Where channels at 16 cannot reach a MAC target, --structure channels,blocks removes residual blocks
# instead (resnet20, 70% MACs: 2.4-3.6x dense int8 at 32x32, 2.7-2.8x at 128x128, against 1.2-1.5x and
# 1.05-1.4x for the fp32 default's widths run in int8). A table-driven plan could still use 8 where the
# device's int8 table shows it pays: --min-channels 8.
INT8_ROUNDING = {"multiple": DEFAULT_CHANNEL_MULTIPLE, "min_channels": DEFAULT_CHANNEL_MULTIPLE}


def default_rounding(quantize: Optional[str]) -> Dict[str, int]:
    """The rounding a run without --channel-multiple uses: ``INT8_ROUNDING`` when it plans for int8."""
    return dict(INT8_ROUNDING if quantize == "int8" else DEFAULT_ROUNDING)
