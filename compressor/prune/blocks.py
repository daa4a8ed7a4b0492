"""Depth pruning: whole residual blocks removed, each replaced by its identity path.

At batch 1 on a CPU every layer costs a fixed few microseconds whatever its width, so narrower
channels stop paying below some width; fewer layers keep paying (resnet20 with one block per stage
runs 3.3x faster than dense at 32x32, narrowest channels 2.2x). A *removable block* is a submodule
``M`` whose forward is ``tail(branch(x) + x)``: one tensor input, the input itself added to a branch
computed from it (an identity shortcut, not a projection), every Conv/Linear of ``M`` in the branch,
the same output shape as input shape. ``torch.fx`` reads that off ``M``'s own graph; a forward pass
of the whole model checks the shapes. Removing ``M`` replaces it by ``tail(x)`` (what ``M`` computes
with its branch zeroed), or by ``nn.Identity`` when the tail is only ReLUs and ``M``'s input is already
a ReLU's output (ReLU is idempotent: exactly the same numbers, one node less at run time). Layers
outside a removable block are never removed; a block is named by its module name, which is what a
RUN_DIR stores (``final.pt``'s ``"blocks_removed"``), so a reader rebuilds the network from the dense
factory with :func:`remove_blocks`.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

from compressor.errors import CheckpointError, StructureError
from compressor.prune.examples import call_example

# channels.PRUNABLE's layer types; not imported from there: channels imports the criteria, which import this
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_ADDS = {operator.add, operator.iadd, torch.add}
_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}
_RELU_MODULES = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class Block:
    """One removable residual block: its module name, the Conv/Linear layers that go with it, and
    whether its input is a ReLU's output (then a ReLU-only tail is dropped too)."""

    name: str
    layers: Tuple[str, ...]
    input_nonnegative: bool = False


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), _RELU_MODULES)


def _residual(graph: fx.Graph) -> Optional[Tuple[fx.Node, fx.Node, fx.Node]]:
    """``(input, add, branch)`` when the graph adds its only input to a branch computed from it, once."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    x = inputs[0]
    adds = [n for n in graph.nodes if _is_add(n) and x in n.args]
    if len(adds) != 1 or adds[0].args[0] is adds[0].args[1]:
        return None
    add = adds[0]
    branch = add.args[1] if add.args[0] is x else add.args[0]
    return (x, add, branch) if isinstance(branch, fx.Node) else None


def _traced(module: nn.Module) -> Optional[fx.GraphModule]:
    try:
        return fx.symbolic_trace(module)
    except Exception:  # control flow on values, unsupported ops: not a block we can read
        return None


def _tail(module: nn.Module, drop_relu: bool = False) -> Optional[fx.GraphModule]:
    """``module``'s graph with the branch gone (the add replaced by its identity input), or None when
    ``module`` is not a residual block or a Conv/Linear would survive outside the branch."""
    traced = _traced(module)
    found = _residual(traced.graph) if traced is not None else None
    if found is None:
        return None
    x, add, _ = found
    add.replace_all_uses_with(x)
    traced.graph.erase_node(add)
    traced.graph.eliminate_dead_code()
    modules = dict(traced.named_modules())
    if drop_relu:  # relu(x) == x for the ReLU output x: the tail's ReLUs on x change nothing
        for node in [n for n in traced.graph.nodes if _is_relu(n, modules) and n.args[:1] == (x,)]:
            node.replace_all_uses_with(x)
            traced.graph.erase_node(node)
        traced.graph.eliminate_dead_code()
    used = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    if any(isinstance(modules.get(name), PRUNABLE) or any(True for _ in modules[name].parameters())
           for name in used if name in modules):
        return None
    if any(n.op == "get_attr" for n in traced.graph.nodes):
        return None  # the tail reads a parameter or buffer of the block: not a plain identity path
    traced.delete_all_unused_submodules()  # the branch's layers and their weights go with it
    _not_in_place(traced)
    traced.recompile()
    return traced


def _not_in_place(traced: fx.GraphModule) -> None:
    """The tail's ReLUs made out-of-place: in the block they overwrote the add's fresh output, in the
    tail they would overwrite the block's input, which other layers may still read."""
    for node in traced.graph.nodes:
        if node.op == "call_function" and node.target is torch.relu_:
            node.target = torch.relu
        elif node.op == "call_method" and node.target == "relu_":
            node.target = "relu"
        elif node.op == "call_module" and isinstance(traced.get_submodule(str(node.target)), _RELU_MODULES):
            traced.get_submodule(str(node.target)).inplace = False


def branch_of(module: nn.Module) -> nn.Module:
    """The residual branch ``F`` of a removable block (sharing its layers), for criteria that score
    ``F(x)``; the block's own graph with its output moved to the branch."""
    traced = _traced(module)
    found = _residual(traced.graph) if traced is not None else None
    if found is None:
        raise StructureError(f"{type(module).__name__} is not a removable residual block")
    output = next(n for n in traced.graph.nodes if n.op == "output")
    output.args = (found[2],)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


@contextlib.contextmanager
def _hooked_eval(model: nn.Module, hooks: List[Any]) -> Iterator[None]:
    """Run the block in eval mode without gradients; then remove ``hooks`` and restore the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def _calls(model: nn.Module, names: Sequence[str], example: Any) -> Dict[str, List[Tuple]]:
    """For each module in ``names``: (input shapes, output shape) of every call in one forward."""
    modules = dict(model.named_modules())
    seen: Dict[str, List[Tuple]] = {name: [] for name in names}
    hooks = []
    for name in names:
        def record(_m, args, kwargs, out, name=name):
            shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
            seen[name].append((shapes, bool(kwargs), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        hooks.append(modules[name].register_forward_hook(record, with_kwargs=True))
    with _hooked_eval(model, hooks):
        call_example(model, example)  # a tensor, or several/keyword inputs as the data gives them
    return seen


def _same_shape(calls: List[Tuple]) -> bool:
    """Called once, with one tensor and no keywords, returning a tensor of that tensor's shape."""
    if len(calls) != 1:
        return False
    shapes, has_kwargs, out = calls[0]
    return len(shapes) == 1 and shapes[0] is not None and not has_kwargs and out == shapes[0]


def find_blocks(model: nn.Module, example: torch.Tensor, exclude: Sequence[str] = ()) -> List[Block]:
    """The removable residual blocks of ``model`` (outermost first, in module order); blocks that
    hold an ``--exclude``d layer stay."""
    excluded = {e[: -len(".weight")] if e.endswith(".weight") else e for e in exclude}
    candidates: List[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in candidates):
            continue
        layers = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, PRUNABLE)]
        if layers and not excluded.intersection(layers) and _tail(module) is not None:
            candidates.append(name)
    if not candidates:
        return []
    calls = _calls(model, candidates, example)
    names = [c for c in candidates if _same_shape(calls[c])]
    nonnegative = _nonnegative_inputs(model, names)
    modules = dict(model.named_modules())
    return [Block(name, tuple(f"{name}.{n}" for n, m in modules[name].named_modules() if isinstance(m, PRUNABLE)),
                  name in nonnegative) for name in names]


def _nonnegative_inputs(model: nn.Module, names: Sequence[str]) -> Set[str]:
    """The blocks whose input is the output of a ReLU (or of a block ending in one), read from the whole
    model's graph with the blocks as leaves; none when the whole model cannot be traced."""
    chosen = set(names)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return qualified_name in chosen or super().is_leaf_module(m, qualified_name)

    try:
        graph = Tracer().trace(model)
    except Exception:  # an untraceable model keeps every tail: exact either way, one node more
        return set()
    modules = dict(model.named_modules())

    def ends_in_relu(node: object) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if _is_relu(node, modules):
            return True
        if node.op == "call_module" and str(node.target) in chosen:
            traced = _traced(modules[str(node.target)])
            output = next(n for n in traced.graph.nodes if n.op == "output") if traced is not None else None
            return output is not None and isinstance(output.args[0], fx.Node) and \
                _is_relu(output.args[0], dict(traced.named_modules()))
        return False

    return {str(n.target) for n in graph.nodes
            if n.op == "call_module" and str(n.target) in chosen and ends_in_relu(n.args[0] if n.args else None)}


def _replacement(block: Block, module: nn.Module) -> nn.Module:
    tail = _tail(module, drop_relu=block.input_nonnegative)
    if tail is None:
        raise StructureError(f"block {block.name!r} is no longer a removable residual block")
    computes = [n for n in tail.graph.nodes if n.op not in ("placeholder", "output")]
    return nn.Identity() if not computes else tail


def remove_blocks(model: nn.Module, blocks: Sequence[Block], names: Sequence[str]) -> nn.Module:
    """Replace, in place, each block named in ``names`` by its identity path (see the module doc);
    returns ``model``. ``blocks`` are :func:`find_blocks`' of the dense model."""
    by_name = {b.name: b for b in blocks}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _replacement(by_name[name], getattr(parent, attr)))
    return model


def removed_layers(blocks: Sequence[Block], names: Sequence[str]) -> Set[str]:
    """The Conv/Linear layer names that removing the blocks ``names`` takes away (for latency and node
    counts of a plan: every layer of the dense model not in this set is still there)."""
    gone = set(names)
    return {layer for b in blocks if b.name in gone for layer in b.layers}


def decode_blocks(stored: object, blocks: Sequence[Block], source: str) -> Tuple[str, ...]:
    """A level's ``"blocks_removed"`` checked against the model's removable blocks (RUN_DIRs may come
    from elsewhere); in the model's order."""
    if stored is None:
        return ()
    known = [b.name for b in blocks]
    if not isinstance(stored, (list, tuple)) or any(not isinstance(n, str) for n in stored) \
            or len(set(stored)) != len(stored) or not set(stored) <= set(known):
        raise CheckpointError(f"{source}: 'blocks_removed' {stored!r} does not name removable blocks of the "
                              f"model (it has {', '.join(known) or 'none'})")
    return tuple(n for n in known if n in set(stored))


def require_blocks(blocks: Sequence[Block]) -> None:
    """One line for ``--structure blocks`` on a model with nothing to remove."""
    if not blocks:
        raise StructureError("--structure blocks: the model has no removable residual block (a submodule whose "
                             "output is its input plus a branch computed from it, same shape, identity "
                             "shortcut); use --structure channels")


Feed = Callable[[nn.Module], object]


@torch.no_grad()
def block_inputs(model: nn.Module, names: Sequence[str], feed: Feed) -> Dict[str, torch.Tensor]:
    """Each block's input tensor during ``feed(model)`` (one forward on a real batch), in eval mode."""
    modules = dict(model.named_modules())
    seen: Dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0]))
             for name in names]
    with _hooked_eval(model, hooks):
        feed(model)
    return seen
