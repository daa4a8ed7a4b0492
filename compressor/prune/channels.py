"""Structured pruning: whole channels removed with every tensor coupled to them.

Which tensors are coupled (BatchNorm, the next layer's inputs, every branch of a residual ``add``,
concatenations, depthwise and grouped convs, the first Linear after a flatten) comes from
Torch-Pruning's ``DependencyGraph`` (Fang et al., DepGraph, CVPR 2023), which traces the model's
autograd graph; edgeprune adds the global ranking, the channel rounding and the bookkeeping, and
(``layer_pruners``) the layers Torch-Pruning does not prune: Hugging Face's Conv1D and GRU/LSTM/RNN.

A *group* is a set of coupled channels, named after its root: the Conv/Linear (Conv1D, RNN; or an
Embedding no other group reaches) whose output channels define it. A *plan* (``ChannelPlan``) maps every root to the dense model's channel indices
that are kept. Plans are what a RUN_DIR stores (int64 tensors, loadable with ``weights_only``):
rebuilding a level is "build the dense model from its factory, :func:`shrink` it to the plan, load
its state_dict" — deterministic, so ``load_level``, export and ``--resume`` get the same network.

Never pruned: the layers whose output channels reach the model's output (the classifier), the
input's channels (no group contains them), ``--exclude``d layers (a group touching one stays
whole), and no group below one ``--channel-multiple`` of channels (``--min-channels`` when given;
or its current width if that is smaller) — so no layer ever disappears.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from compressor.prune import layer_pruners
from compressor.prune.examples import Example, call_example, device_of, move_example, no_cache
from compressor.prune.criteria import ChannelCriterion
from compressor.errors import CheckpointError, StructureError

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# roots beyond Conv/Linear: an Embedding's dimension (tried after the others, so groups they already name
# keep their names), and layer_pruners' layers (HF Conv1D, GRU/LSTM/RNN) found by instance
EMBEDDING_ROOTS = (nn.Embedding,)
ChannelPlan = Dict[str, List[int]]


@dataclass(frozen=True)
class Group:
    """One set of coupled channels: its root layer's name, its dense width, and ``blocks`` > 1 when a
    grouped conv is in it (then the same positions go in every one of the ``blocks`` blocks)."""

    root: str
    size: int
    blocks: int = 1


def _tp():
    # Imported on use: Torch-Pruning is only needed for --structure channels.
    import torch_pruning

    logging.getLogger("torch_pruning").setLevel(logging.ERROR)
    return torch_pruning


def _layer_types(graph) -> Callable[[nn.Module], bool]:
    """Whether Torch-Pruning follows a module as a layer of its own (Conv, Linear, norms, Embedding, ...)
    rather than as a container of ops; ``graph`` is an empty DependencyGraph (its registered pruners)."""
    tp = _tp()

    def is_layer(module: nn.Module) -> bool:
        if layer_pruners.is_extra(module):
            return True
        kind = tp.ops.module2type(module)
        return kind in graph.REGISTERED_PRUNERS and kind != tp.ops.OPTYPE.ELEMENTWISE
    return is_layer


def _unwrapped(model: nn.Module, is_layer: Callable[[nn.Module], bool]) -> List[Tuple[nn.Parameter, int]]:
    """The bare ``nn.Parameter``s no Torch-Pruning layer owns (ConvNeXt's layer scale, LeViT's attention
    biases, ViT's position table), each with the dimension that follows the channels: a vector's only
    one, else the last that is not 1 (channels last, as these tables are laid out)."""
    owned = {id(p) for m in model.modules() if is_layer(m) for p in m.parameters(recurse=False)}
    found = []
    for param in model.parameters():
        sizes = [i for i, size in enumerate(param.shape) if size > 1]
        if id(param) not in owned and sizes:
            found.append((param, sizes[-1]))
    return found


def _output_tensors(output: Any) -> List[torch.Tensor]:
    """Every tensor in a model's output (tensor, tuple/list, dict, ModelOutput); a Hugging Face cache
    object or any other non-tensor is left out, as Torch-Pruning follows tensors only."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _output_tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in _output_tensors(value)]
    return []


def _traced_outputs(model: nn.Module, example: Example) -> List[torch.Tensor]:
    return _output_tensors(call_example(model, example))


def trace(model: nn.Module, example: Example):
    """Torch-Pruning's dependency graph of ``model`` on ``example``; ``StructureError`` naming the layer or
    op when the model cannot be traced. Traced in eval mode so BatchNorm statistics are not touched, without
    a Hugging Face key/value cache (its concatenations are generation state), each RNN as one node."""
    graph = _graph_class()()
    is_layer = _layer_types(graph)
    called: List[nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, _i, _o: called.append(module))
             for m in model.modules() if is_layer(m) and any(True for _ in m.parameters(recurse=False))]
    was_training = model.training
    model.eval()
    try:
        # the graph is read from autograd: callers may be under no_grad
        with torch.enable_grad(), no_cache(model), layer_pruners.opaque_rnns(model):
            graph.build_dependency(model, example_inputs=example, forward_fn=_traced_outputs,
                                   unwrapped_parameters=_unwrapped(model, is_layer), verbose=False,
                                   customized_pruners=layer_pruners.customized_pruners(model))
        _untie_channels_last_slices(graph)
    except Exception as error:  # the user's forward or an op Torch-Pruning cannot follow
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise StructureError(f"--structure channels: tracing the model failed ({type(error).__name__}: "
                             f"{detail[:200]}); use --structure weights for this model") from error
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    names = {module: name for name, module in model.named_modules()}
    for module in called:
        frozen = not any(p.requires_grad for p in module.parameters(recurse=False))  # a fixed table
        if module not in graph.module2node and not frozen:
            raise StructureError(
                f"--structure channels: layer {names.get(module, type(module).__name__)!r} "
                f"({type(module).__name__}) is not on the autograd path to the output (an op such as "
                f"detach(), .data, .numpy() or torch.no_grad() cuts the graph there), so its channels "
                f"cannot be traced; remove that op or use --structure weights")
    return graph


def _graph_class():
    """Torch-Pruning's ``DependencyGraph``, made to pass channel shuffles through: its index mapping takes
    ShuffleNet's ``view(N, g, C/g, H, W) -> transpose(1, 2) -> view(N, C, H, W)`` for a flatten and divides by
    zero (Torch-Pruning 1.6), or maps a shuffled channel to the wrong one. The shuffle's reshapes are marked
    (``shuffles``) and passed through unchanged, and ``find_groups`` keeps every group through one whole."""
    tp = _tp()

    class ShuffleAwareGraph(tp.DependencyGraph):
        shuffles: set = set()

        def _build_dependency(self, module2node):
            # runs before the index mapping is derived: the shuffle's nodes must not be mapped as reshapes
            super()._build_dependency(module2node)
            for node in module2node.values():
                if node.type == tp.ops.OPTYPE.SPLIT and _SplitSizes.fits(node.grad_fn):
                    node.grad_fn = _SplitSizes(node.grad_fn)
            self.shuffles = _channel_shuffles(module2node.values())
            for node in self.shuffles:
                node.type = tp.ops.OPTYPE.ELEMENTWISE
    return ShuffleAwareGraph


class _SplitSizes:
    """A ``chunk``'s autograd node with the chunk sizes spelled out (``_saved_split_sizes``): Torch-Pruning
    1.6 reads exact sizes only from ``split`` with a list, and infers a ``chunk``'s from the layers after it,
    which counts a whole concatenation for ShuffleNet's ``x1, x2 = x.chunk(2, 1); cat([x1, f(x2)])``."""

    def __init__(self, grad_fn: Any) -> None:
        self._grad_fn = grad_fn
        total, size = int(grad_fn._saved_self_sym_sizes[1]), int(grad_fn._saved_split_size)
        self._saved_split_sizes = [min(size, total - start) for start in range(0, total, size)]

    @staticmethod
    def fits(grad_fn: Any) -> bool:
        """A chunk of the channels (dim 1) of a 4-D tensor, the case Torch-Pruning's index mapping handles."""
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        return hasattr(grad_fn, "_saved_split_size") and not hasattr(grad_fn, "_saved_split_sizes") \
            and sizes is not None and len(sizes) == 4 and getattr(grad_fn, "_saved_dim", None) == 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grad_fn, name)


def _channel_shuffles(nodes) -> set:
    """The reshape nodes of every channel shuffle: a view of a 4-D (N, C, H, W) tensor into (N, g, C/g, H, W),
    transposed through elementwise ops (``contiguous``) into a view of that 5-D tensor back to 4-D."""
    tp = _tp()

    def sizes(node) -> Tuple[int, ...]:
        return tuple(int(s) for s in getattr(node.grad_fn, "_saved_self_sym_sizes", ()) or ())

    def before(node):  # the nearest non-elementwise producer, past contiguous/clone copies
        while len(node.inputs) == 1 and node.inputs[0].type == tp.ops.OPTYPE.ELEMENTWISE \
                and not _is_transpose(node.inputs[0]):
            node = node.inputs[0]
        return node.inputs[0] if len(node.inputs) == 1 else None

    found = set()
    for node in nodes:
        merged = sizes(node)
        if node.type != tp.ops.OPTYPE.RESHAPE or len(merged) != 5:
            continue
        transpose = before(node)
        split = before(transpose) if transpose is not None and _is_transpose(transpose) else None
        if split is None or split.type != tp.ops.OPTYPE.RESHAPE:
            continue
        dense = sizes(split)
        if len(dense) == 4 and dense[1] == merged[1] * merged[2] and dense[2:] == merged[3:]:
            found |= {node, split}
    return found


def _is_transpose(node) -> bool:
    return node.grad_fn is not None and type(node.grad_fn).__name__.startswith(("TransposeBackward",
                                                                                  "PermuteBackward"))


def _untie_channels_last_slices(graph) -> None:
    """Torch-Pruning takes a slice of dim 1 of a 4-D tensor for a slice of its channels (NCHW); on a
    channels-last tensor (LeViT's ``view(B, H, W, C)[:, ::2, ::2]``) that maps removed channels through the
    spatial stride, so the layers after it lose fewer inputs than their producers lose outputs. A slice
    whose dimension is not the channel count of what it slices passes channels through unchanged."""
    tp = _tp()
    from torch_pruning.dependency import index_mapping, shape_infer

    for node in list(graph.module2node.values()):
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        if node.type != tp.ops.OPTYPE.SLICE or sizes is None or not node.inputs:
            continue
        dim = node.module.dim
        channels = shape_infer.infer_out_channels_recursively(graph, node.inputs[0], [0])
        if channels is None or not 0 <= dim < len(sizes) or int(sizes[dim]) == channels:
            continue
        node.type = tp.ops.OPTYPE.ELEMENTWISE  # so update_index_mapping never maps it again
        for dep in [*node.dependencies, *(d for n in node.inputs for d in n.dependencies if d.target is node)]:
            dep.index_mapping = [None if isinstance(m, index_mapping._SliceIndexMapping) else m
                                 for m in dep.index_mapping]


def _absorbs(module: Any) -> bool:
    """Whether a layer consumes its input channels (a Conv/Linear/RNN), rather than passing them on."""
    return (isinstance(module, PRUNABLE) and not _is_depthwise(module)) or (
        isinstance(module, nn.Module) and layer_pruners.is_extra(module))


def _reaches_output(graph, module: nn.Module) -> bool:
    """Whether ``module``'s output channels reach the model's output without passing a layer that
    absorbs them (a Conv/Linear consumes channels; elementwise ops, BatchNorm, pooling pass them on)."""
    stack, seen = [graph.module2node[module]], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if not node.outputs:
            return True
        for out in node.outputs:
            if _absorbs(out.module):
                continue
            stack.append(out)
    return False


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1 \
        and module.groups == module.in_channels


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if layer_pruners.is_extra(module):
        return int(layer_pruners.out_channels(module) or 0)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _full_group(graph, module: nn.Module, indices: Sequence[int]):
    pruner = graph.get_pruner_of_module(module)
    return graph.get_pruning_group(module, pruner.prune_out_channels, list(indices))


def _blocks(graph, group) -> int:
    """Channel blocks forced by grouped (not depthwise) convs in the group (MetaPruner's rule), and by a
    bidirectional RNN whose hidden units the group removes (each unit sits once per direction)."""
    blocks = 1
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module):
            blocks = max(blocks, module.groups)
        if isinstance(module, nn.RNNBase) and graph.is_out_channel_pruning_fn(dep.handler):
            blocks = max(blocks, layer_pruners.blocks(module))
    return blocks


def find_groups(model: nn.Module, example: Example, exclude: Sequence[str] = ()) -> List[Group]:
    """The prunable channel groups of ``model`` (dense), in a deterministic order."""
    graph = trace(model, example)
    names = {module: name for name, module in model.named_modules()}
    excluded = {module for name, module in model.named_modules()
                if name in {e[: -len(".weight")] if e.endswith(".weight") else e for e in exclude}}
    groups: List[Group] = []
    skipped: List[str] = []
    for group in _all_groups(graph, model):
        root = group[0].dep.target.module
        members = [dep.target.module for dep, _ in group]
        if any(m in excluded for m in members):
            continue  # --exclude keeps a layer whole: neither its inputs nor its outputs shrink
        if any(dep.target in graph.shuffles for dep, _ in group):
            continue  # a channel shuffle interleaves these channels: removing one would remove another
        outs = [dep.target.module for dep, _ in group
                if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module)]
        if any(_reaches_output(graph, m) for m in outs if m in graph.module2node):
            continue  # the classifier's outputs (and anything tied to them) are the model's contract
        size = _out_channels(root)
        blocks = _blocks(graph, group)
        period = _concat_period(graph, group, root, size)
        if period is None or size % math.lcm(blocks, period):
            skipped.append(names[root])
            continue  # its channels are tied in an irregular pattern (a concatenation cut by a slice)
        groups.append(Group(names[root], size, math.lcm(blocks, period)))
    if skipped:
        logging.getLogger("compressor").info(
            f"--structure channels: {len(skipped)} channel group(s) stay whole: a concatenation ties their "
            f"channels unevenly: {', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''}")
    groups = _removable(model, example, groups)
    if not groups:
        raise StructureError("--structure channels: the model has no prunable channel group "
                             "(every Conv/Linear feeds the output or is excluded)")
    return groups


def _concat_period(graph, group, root: nn.Module, size: int) -> Optional[int]:
    """How many of the root's own channels one channel drags along, when a concatenation loops them back
    (GhostNet: ``cat([x1, depthwise(x1)])`` feeds a residual sum with the root, so its channels ``p`` and
    ``p + size/2`` go together): 2 there, 1 for a group without a concatenation; ``None`` when the tied
    channels are not one position in every one of ``size/k`` blocks (the concatenation is cut short by a
    slice, GhostNet's ``[:, :oup]`` on an odd ``oup``). Torch-Pruning removes the whole tie, so the plan
    must count it as one unit (as ``Group.blocks``), or its counts and the channel rounding go wrong."""
    tp = _tp()
    if not any(dep.target.type == tp.ops.OPTYPE.CONCAT for dep, _ in group):
        return 1
    periods = set()
    for probe in (0, size - 1):  # the first and the last channel: a cut-short tail shows at the end
        tied = sorted({int(i) for item in _full_group(graph, root, [probe]) if item.dep.target.module is root
                       and graph.is_out_channel_pruning_fn(item.dep.handler) for i in item.idxs})
        if not tied or size % len(tied):
            return None
        step = size // len(tied)
        if tied != [probe % step + b * step for b in range(len(tied))]:
            return None
        periods.add(len(tied))
    return periods.pop() if len(periods) == 1 else None


def _all_groups(graph, model: nn.Module) -> List[Any]:
    """Torch-Pruning's groups rooted at Conv/Linear and layer_pruners' layers, then those rooted at an
    Embedding no earlier group covers (an Embedding feeding a residual stream is in that stream's group)."""
    extra = tuple({type(m) for m in model.modules() if layer_pruners.is_extra(m)})
    first = list(graph.get_all_groups(root_module_types=PRUNABLE + extra))
    covered = [dep.target.module for group in first for dep, _ in group
               if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module)]
    return first + list(graph.get_all_groups(ignored_layers=covered, root_module_types=EMBEDDING_ROOTS))


def _remove_one_unit(model: nn.Module, example: Example, groups: Sequence[Group]) -> bool:
    """Whether ``model`` (a copy: it is pruned) still runs after two adjacent channels (per block) of each
    of ``groups`` are removed (one, from a group of two). Torch-Pruning does not know every coupling:
    attention reshapes a projection's channels into heads (``view(B, T, heads, -1)``), a weight-normed
    conv cannot be re-registered; two channels, not one, so that an index mapping through a strided op,
    which keeps every other channel, shows as a shape mismatch."""
    model.eval()  # BatchNorm on one example fails in training mode
    try:
        graph = trace(model, example)
        modules = dict(model.named_modules())
        for g in groups:
            units = g.size // g.blocks
            if units > 1:
                removed = [b * units + k for b in range(g.blocks) for k in range(min(2, units - 1))]
                _full_group(graph, modules[g.root], removed).prune(record_history=False)
        with torch.no_grad():
            call_example(model, example)
        return True
    except Exception:  # any failure means: this group is not removable as Torch-Pruning sees it
        return False


def _removable(model: nn.Module, example: Example, groups: List[Group]) -> List[Group]:
    """The groups whose channels can really be removed: all of them when removing a channel of every
    group at once runs (one trace), else each is tried alone; the others stay whole (like --exclude)."""
    if not groups or _remove_one_unit(copy_model(model), example, groups):
        return groups
    kept = [g for g in groups if _remove_one_unit(copy_model(model), example, [g])]
    left = [g.root for g in groups if g not in kept]
    logging.getLogger("compressor").info(
        f"--structure channels: {len(left)} channel group(s) stay whole: removing a channel breaks the model "
        f"(attention heads, a parametrized layer): {', '.join(left[:4])}{', ...' if len(left) > 4 else ''}")
    return kept


def full_plan(groups: Sequence[Group]) -> ChannelPlan:
    """The dense model's plan: every channel kept."""
    return {g.root: list(range(g.size)) for g in groups}


@torch.no_grad()
def shrink(model: nn.Module, current: Mapping[str, Sequence[int]], new: Mapping[str, Sequence[int]],
           example: Example) -> nn.Module:
    """Remove, in place, the channels that ``current`` keeps and ``new`` does not (both in dense
    indices); returns ``model``. Each group's removal is checked with a forward pass, so a graph that
    Torch-Pruning misreads fails here naming the group's root layer."""
    modules = dict(model.named_modules())
    graph = None
    was_training = model.training
    model.eval()
    try:
        for root, kept_now in current.items():
            keep = set(int(i) for i in new[root])
            removed = [pos for pos, channel in enumerate(kept_now) if int(channel) not in keep]
            if not removed:
                continue
            if graph is None:
                graph = trace(model, example)
            try:
                _full_group(graph, modules[root], removed).prune(record_history=False)
                call_example(model, example)
            except Exception as error:
                raise StructureError(f"--structure channels: removing channels of layer {root!r} breaks the "
                                     f"model ({type(error).__name__}: {str(error)[:160]}); --exclude {root} "
                                     f"or use --structure weights") from error
    finally:
        model.train(was_training)
    return model


@torch.no_grad()
def group_scores(model: nn.Module, groups: Sequence[Group], plan: Mapping[str, Sequence[int]],
                 criterion: ChannelCriterion, example: Example) -> Dict[str, torch.Tensor]:
    """Per group, one score per current channel: the criterion's layer scores averaged over every
    Conv/Linear whose output channels the group removes (a residual stage's convs vote together)."""
    graph = trace(model, example)
    modules = dict(model.named_modules())
    following_bn = _following_batchnorm(graph, model)
    scores: Dict[str, torch.Tensor] = {}
    for g in groups:
        width = len(plan[g.root])
        total, count = torch.zeros(width), torch.zeros(width)
        for item in _full_group(graph, modules[g.root], range(width)):
            module = item.dep.target.module
            if not (_scored(module) and graph.is_out_channel_pruning_fn(item.dep.handler)):
                continue
            layer = _layer_scores(criterion, module, following_bn.get(module))
            # idxs: channels of this layer; root_idxs: the same channels counted in the root (concat offsets)
            own = torch.tensor([int(i) for i in item.idxs], dtype=torch.long)
            root = torch.tensor([int(i) for i in item.root_idxs], dtype=torch.long)
            total.index_add_(0, root, layer[own])
            count.index_add_(0, root, torch.ones(len(root)))
        scores[g.root] = total / count.clamp_min(1.0)
    return scores


def _scored(module: Any) -> bool:
    return isinstance(module, PRUNABLE + EMBEDDING_ROOTS) or (
        isinstance(module, nn.Module) and layer_pruners.is_extra(module))


class _Rows:
    """A layer's weights as one row per output channel, for criteria that read ``module.weight`` rows
    (an Embedding's channels are its columns; an RNN unit's weights are spread over its gates)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


def _layer_scores(criterion: ChannelCriterion, module: nn.Module, bn: Optional[nn.Module]) -> torch.Tensor:
    if isinstance(module, PRUNABLE):
        return criterion.layer_scores(module, bn).cpu()
    rows = module.weight.detach().t() if isinstance(module, nn.Embedding) else layer_pruners.channel_rows(module)
    return criterion.layer_scores(_Rows(rows), None).cpu()  # type: ignore[arg-type]


def _following_batchnorm(graph, model: nn.Module) -> Dict[nn.Module, nn.Module]:
    found = {}
    for module in model.modules():
        if isinstance(module, PRUNABLE) and module in graph.module2node:
            for out in graph.module2node[module].outputs:
                if isinstance(out.module, nn.modules.batchnorm._BatchNorm):
                    found[module] = out.module
    return found


def floor_width(g: Group, multiple: int, narrowest: int) -> int:
    """The narrowest width ``g`` may keep: ``narrowest`` (``--min-channels``, below the multiple) only in a
    group no wider than one ``multiple`` (where the multiple is all it has: resnet20's 16-wide first stage),
    else one ``multiple``. A layer with 8 outputs runs at half the MAC rate of one with 16 on onnxruntime's
    x86 kernels (16-float blocks), so cutting a 32- or 64-wide group to 8 buys far less time than its MACs
    (benchmarks/studies/default_rounding.py: resnet20 at 70% MACs removed, 128x128: efficiency 0.68 with 8
    anywhere, 0.88 with this floor)."""
    return narrowest if g.size // g.blocks <= multiple else multiple


class Ranking:
    """The current channels of every group in one global order, weakest first; ``plan(n)`` removes the
    ``n`` weakest units, then rounds each group's kept count to ``multiple``.

    A *unit* is one channel, or (grouped convs) one position in every block at once. ``plan(n)`` keeps
    fewer channels as ``n`` grows, in every group, which is what makes the binary searches valid.
    """

    def __init__(self, groups: Sequence[Group], current: Mapping[str, Sequence[int]],
                 scores: Mapping[str, torch.Tensor], multiple: int, narrowest: Optional[int] = None) -> None:
        self.groups, self.current, self.multiple = list(groups), current, multiple
        self.narrowest = narrowest or multiple
        self.unit_scores: Dict[str, torch.Tensor] = {}
        entries: List[Tuple[float, int, int]] = []
        for index, g in enumerate(self.groups):
            units = len(current[g.root]) // g.blocks
            unit = scores[g.root].view(g.blocks, units).mean(0)
            self.unit_scores[g.root] = unit
            entries += [(float(s), index, pos) for pos, s in enumerate(unit.tolist())]
        entries.sort()
        self.order = [index for _, index, _ in entries]  # the group of the k-th weakest unit

    @property
    def units(self) -> int:
        return len(self.order)

    def _step(self, g: Group) -> int:
        return max(1, self.multiple // math.gcd(self.multiple, g.blocks))

    def keep_units(self, g: Group, removed: int) -> int:
        """Units kept in ``g`` when ``removed`` of its units rank among the weakest: rounded to the
        nearest multiple of the step, never below one step, never above what it has."""
        have = len(self.current[g.root]) // g.blocks
        if g.blocks == 1 and self.floor(g) != self.multiple:
            return self._nearest_allowed(have, have - removed)
        step = self._step(g)
        if have <= step:
            return have
        rounded = int(math.floor((have - removed) / step + 0.5)) * step
        return min(have, max(step, rounded))

    def floor(self, g: Group) -> int:
        """The narrowest width ``g`` may keep (``floor_width``: blind to time, 8 only where 16 is all there is)."""
        return floor_width(g, self.multiple, self.narrowest) if g.blocks == 1 else self.narrowest

    def _nearest_allowed(self, have: int, wanted: int) -> int:
        """Widths allowed: ``narrowest`` and the multiples of ``multiple`` (e.g. 8, 16 for a 16-wide group
        and 16, 32, 48, 64 for a 64-wide one under --min-channels 8 --channel-multiple 16: ``floor_width``),
        never above ``have``; ties go to the wider."""
        if have <= self.narrowest:
            return have
        allowed = {self.narrowest, have} | set(range(self.multiple, have + 1, self.multiple))
        return min((w for w in allowed if self.narrowest <= w <= have), key=lambda w: (abs(w - wanted), -w))

    def plan(self, n: int) -> ChannelPlan:
        """The plan that removes the ``n`` weakest units (before rounding)."""
        removed = [0] * len(self.groups)
        for index in self.order[:n]:
            removed[index] += 1
        new: ChannelPlan = {}
        for index, g in enumerate(self.groups):
            kept_now = list(self.current[g.root])
            units = len(kept_now) // g.blocks
            keep = self.keep_units(g, removed[index])
            strongest = torch.sort(self.unit_scores[g.root], descending=True, stable=True).indices[:keep]
            positions = sorted(int(p) for p in strongest)
            new[g.root] = sorted(kept_now[b * units + p] for b in range(g.blocks) for p in positions)
        return new


def channel_count(plan: Mapping[str, Sequence[int]]) -> int:
    return sum(len(v) for v in plan.values())


def smallest(n_max: int, ok) -> Optional[int]:
    """The smallest ``n`` in ``[0, n_max]`` with ``ok(n)`` (``ok`` monotone), or None."""
    if not ok(n_max):
        return None
    low, high = 0, n_max
    while low < high:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle + 1
    return low


def encode(plan: Mapping[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
    """A plan as plain int64 tensors (what final.pt stores)."""
    return {root: torch.tensor(list(kept), dtype=torch.int64) for root, kept in plan.items()}


def decode(stored: object, groups: Sequence[Group], source: str) -> ChannelPlan:
    """A stored plan, checked against the model's groups (RUN_DIRs may come from elsewhere)."""
    if not isinstance(stored, dict):
        raise CheckpointError(f"{source}: 'channels' is not a mapping")
    expected = {g.root: g for g in groups}
    if set(stored) != set(expected):
        raise CheckpointError(f"{source}: its channel groups {sorted(stored)} do not fit the model's "
                              f"{sorted(expected)}")
    plan: ChannelPlan = {}
    for root, tensor in stored.items():
        g = expected[root]
        kept = tensor.tolist() if isinstance(tensor, torch.Tensor) else None
        if not isinstance(kept, list) or not kept or any(not isinstance(i, int) for i in kept) \
                or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= g.size or len(kept) % g.blocks:
            raise CheckpointError(f"{source}: kept channels of {root!r} are not sorted indices below {g.size}")
        plan[root] = kept
    return plan


def widths(model: nn.Module) -> Dict[str, int]:
    """Output width of every layer a group can be rooted at (metrics.json's per-layer widths): Conv/Linear,
    Embedding, HF Conv1D, an RNN's hidden units × directions."""
    return {name: _out_channels(m) for name, m in model.named_modules() if _scored(m)}


def params_and_macs(model: nn.Module, example: Example) -> Tuple[int, int]:
    """Parameters and multiply-accumulates of one forward pass at batch 1 (Torch-Pruning's counter)."""
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning for keyword-only inputs
        macs, params = _tp().utils.count_ops_and_params(model, move_example(example, device_of(model)))
    return int(params), int(macs)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy (the dense template is copied, never pruned itself)."""
    return copy.deepcopy(model)
