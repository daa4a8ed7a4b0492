"""How a batch feeds the model and what the loss is: the contract between data, model and training.

A batch is ``(inputs, target)``. ``inputs`` is a tensor (``model(x)``), a tuple/list of tensors
(``model(*inputs)``) or a dict of tensors (``model(**inputs)``: Hugging Face's ``input_ids``,
``attention_mask``, ``pixel_values``). The model may return a tensor, a tuple/list, a dict or a
Hugging Face ``ModelOutput``; :func:`pick_output` takes the tensor the loss is computed on (``--output
NAME``; by default ``logits`` when there is one, else the first tensor). The loss is a named one
(:data:`LOSSES`, ``--loss``) or any callable ``loss(output, target) -> scalar tensor`` that a data
factory provides.

:meth:`Task.probe` runs one forward (and the loss) on one batch before anything is trained or written,
so a model/data pair the compressor cannot drive is refused with one line naming what is missing
instead of a traceback from deep inside training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from compressor.config import LOSS_NAMES
from compressor.errors import ConfigError

Inputs = Any  # a tensor, a tuple/list of tensors, or a dict name -> tensor
SINGLE_INPUT_NAME = "input"  # the graph input's name for a model fed one tensor (MODEL_DIRs before v2 too)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _class_scores(output: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores ``[M, classes]``, labels ``[M]``): per-example ``[N, C]`` or per-token ``[N, T, C]``."""
    if output.dim() == target.dim() + 1 and output.dim() > 2:  # token classification: classes last
        return output.reshape(-1, output.shape[-1]), target.reshape(-1)
    return output, target


def cross_entropy(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the last axis of ``[N, C]`` or ``[N, T, C]`` scores with integer labels."""
    scores, labels = _class_scores(output, target)
    return nn.functional.cross_entropy(scores, labels.long(), reduction=reduction)


def mse(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error (per example when ``reduction="sum"``: summed over examples, meaned within)."""
    per_example = ((output - target.to(output.dtype)) ** 2).reshape(len(output), -1).mean(1)
    return per_example.sum() if reduction == "sum" else per_example.mean()


def l1(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean absolute error (per example when ``reduction="sum"``)."""
    per_example = (output - target.to(output.dtype)).abs().reshape(len(output), -1).mean(1)
    return per_example.sum() if reduction == "sum" else per_example.mean()


# name -> (loss(output, target, reduction), whether argmax accuracy means something for it)
LOSSES: Dict[str, Tuple[Callable[..., torch.Tensor], bool]] = {
    "cross-entropy": (cross_entropy, True),
    "mse": (mse, False),
    "l1": (l1, False),
}
assert tuple(LOSSES) == LOSS_NAMES, "PruneConfig validates --loss against LOSS_NAMES"


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*inputs)`` or ``model(**inputs)`` as the batch's inputs say."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def flat_outputs(output: Any, prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    """Every tensor in a model's output, named and in the order ``torch.onnx.export`` flattens them:
    a tensor is ``output``; tuple items ``output_0``, ...; dict / ModelOutput entries by their keys."""
    if isinstance(output, torch.Tensor):
        return [(prefix or "output", output)]
    if isinstance(output, Mapping):
        found: List[Tuple[str, torch.Tensor]] = []
        for key, value in output.items():
            if value is not None:
                found += flat_outputs(value, f"{prefix}.{key}" if prefix else str(key))
        return found
    if isinstance(output, (tuple, list)):
        found = []
        for i, value in enumerate(output):
            found += flat_outputs(value, f"{prefix}_{i}" if prefix else f"output_{i}")
        return found
    return []


def pick_output(output: Any, name: Optional[str] = None) -> Tuple[str, torch.Tensor]:
    """``(name, tensor)``: the output called ``name``, else ``logits`` when present, else the first tensor.

    ``name`` may also be a tuple position (``0``, ``1``). Raises ConfigError naming what the model returned.
    """
    found = flat_outputs(output)
    if not found:
        raise ConfigError(f"the model returned a {type(output).__name__}, not a tensor, tuple, dict or ModelOutput "
                          "of tensors")
    names = [n for n, _ in found]
    if name is None:
        return next(((n, t) for n, t in found if n == "logits"), found[0])
    for candidate in (name, f"output_{name}"):
        if candidate in names:
            return found[names.index(candidate)]
    raise ConfigError(f"the model has no output {name!r}; its outputs: {', '.join(names)}")


def split_batch(batch: Any) -> Tuple[Inputs, torch.Tensor]:
    """``(inputs, target)`` of one batch; ConfigError when a batch is not such a pair."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(f"a batch must be (inputs, target); the data yielded a {type(batch).__name__}"
                      + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""))


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """Move every tensor of ``inputs`` (tensor, tuple/list or dict) to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, Mapping):
        return {key: to_device(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(value, device) for value in inputs)
    return inputs


def example_count(target: Any) -> int:
    """How many examples a batch holds: its target's first dimension."""
    return int(target.shape[0]) if isinstance(target, torch.Tensor) and target.dim() > 0 else 1


@dataclass
class Task:
    """What training optimises: which output, which loss, and whether accuracy (argmax) is meaningful.

    ``Task()`` is the classic contract: the model's (first / logits) output against integer labels
    with cross-entropy.
    """

    loss_name: str = "cross-entropy"
    output: Optional[str] = None
    custom_loss: Optional[LossFn] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.custom_loss is None and self.loss_name not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss_name!r}; choose from {', '.join(LOSSES)} "
                              "(or return a loss callable from the data factory)")
        if self.custom_loss is not None and not callable(self.custom_loss):
            raise ConfigError(f"the data factory's loss is a {type(self.custom_loss).__name__}, not a callable")

    @property
    def has_accuracy(self) -> bool:
        """Whether argmax accuracy is reported (classification losses); otherwise accuracy is NaN."""
        return self.custom_loss is None and LOSSES[self.loss_name][1]

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The output tensor the loss is computed on."""
        return pick_output(call_model(model, inputs), self.output)[1]

    def loss(self, output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss of one batch (``reduction="sum"``: summed over its examples, for evaluation)."""
        if self.custom_loss is not None:
            value = self.custom_loss(output, target)
            return value * example_count(target) if reduction == "sum" else value
        return LOSSES[self.loss_name][0](output, target, reduction=reduction)

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> Tuple[int, int]:
        """``(correct, counted)`` argmax predictions; ``(0, 0)`` when accuracy means nothing here."""
        if not self.has_accuracy:
            return 0, 0
        scores, labels = _class_scores(output, target)
        return int((scores.argmax(-1) == labels).sum()), int(labels.numel())

    @torch.no_grad()
    def probe(self, model: nn.Module, loader: Iterable, device: torch.device, what: str = "data") -> None:
        """One forward and one loss on the first batch of ``loader``, in eval mode (nothing is trained,
        no BatchNorm statistic moves). Raises ConfigError naming what does not fit."""
        try:
            batch = next(iter(loader))
        except StopIteration:
            raise ConfigError(f"the {what} yields no batch") from None
        except ConfigError:
            raise
        except Exception as error:  # the user's loader: report it, don't crash with our traceback
            raise ConfigError(f"reading a batch of the {what} failed: {_one_line(error)}") from error
        inputs, target = split_batch(batch)
        if not isinstance(target, torch.Tensor):
            raise ConfigError(f"the {what}'s target is a {type(target).__name__}, not a tensor")
        was_training = model.training
        model.eval()
        try:
            try:
                raw = call_model(model, to_device(inputs, device))
            except Exception as error:
                raise ConfigError(f"the model cannot take a batch of the {what} ({_describe(inputs)}): "
                                  f"{_one_line(error)}") from error
            name, output = pick_output(raw, self.output)
            if not output.is_floating_point():
                raise ConfigError(f"the model's output {name!r} is {output.dtype}, not a float tensor to train on")
            try:
                value = self.loss(output, target.to(device))
            except Exception as error:
                raise ConfigError(f"loss {self.loss_label} cannot compare output {name!r} {list(output.shape)} "
                                  f"with the target {list(target.shape)} ({target.dtype}): {_one_line(error)} "
                                  "(choose --loss or --output)") from error
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ConfigError(f"loss {self.loss_label} must return a scalar tensor")
        finally:
            model.train(was_training)

    @property
    def loss_label(self) -> str:
        return "from the data factory" if self.custom_loss is not None else self.loss_name


def _describe(inputs: Inputs) -> str:
    """``dict input_ids [8, 16] int64, ...``: what a batch's inputs are, for error messages."""
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
        return type(value).__name__
    if isinstance(inputs, Mapping):
        return "dict " + ", ".join(f"{k} {one(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return "tuple " + ", ".join(one(v) for v in inputs)
    return "tensor " + one(inputs)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def example_inputs(inputs: Inputs, count: int = 1) -> Inputs:
    """The first ``count`` examples of a batch's inputs, detached on the CPU (for export samples)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:count].detach().cpu()
    if isinstance(inputs, Mapping):
        return {key: example_inputs(value, count) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(example_inputs(value, count) for value in inputs)
    raise ConfigError(f"batch inputs of type {type(inputs).__name__} are not tensors")


def named_inputs(model: nn.Module, inputs: Inputs) -> Dict[str, torch.Tensor]:
    """Name each input tensor as the exported graph will, in the graph's order: ``input`` for a single
    tensor, the forward's parameter names for a tuple (``input_ids``, ``attention_mask``), a dict's keys
    in the forward's parameter order (the order ``torch.onnx.export`` gives keyword arguments)."""
    if isinstance(inputs, torch.Tensor):
        return {SINGLE_INPUT_NAME: inputs}
    params = _parameter_names(model)
    if isinstance(inputs, Mapping):
        rank = {name: i for i, name in enumerate(params)}
        return {key: inputs[key] for key in sorted(inputs, key=lambda k: rank.get(k, len(rank)))}
    names = params[:len(inputs)]
    if len(names) < len(inputs) or len(set(names)) != len(names):
        names = [f"input_{i}" for i in range(len(inputs))]
    return dict(zip(names, inputs))


def _parameter_names(model: nn.Module) -> List[str]:
    import inspect

    try:
        return [p.name for p in inspect.signature(model.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return []
