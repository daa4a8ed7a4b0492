"""The training loop: the one place where batches meet the optimizer.

It knows nothing about files, levels or methods: the caller (``compressor.pipeline``) builds the
model, optimizer and loaders and passes an ``on_epoch_end`` hook that checkpoints. That keeps the
loop small, and is why ``DistributedDataParallel`` (``compressor.train.distributed``) wraps the model and
shards the loaders without the loop knowing.

Pruned weights stay exactly zero: before each step their gradients and momentum are masked (so
weight decay and momentum carry nothing into them) and after each step they are zeroed again (so
no optimizer arithmetic can leave a tiny non-zero behind).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.errors import DivergedError
from compressor.train.batches import Task, example_count, split_batch, to_device
from compressor.prune.mask import Mask

LrAt = Callable[[float], float]
EpochHook = Callable[[int, float, float], None]


class PrunedWeights:
    """The pruned weights lined up with their keep-masks (as float tensors) for fused updates.

    Masking right after every optimizer step is what holds pruned weights at exactly zero: each pruned
    weight and its momentum buffer are multiplied by the mask, so neither momentum nor weight decay
    can revive one. (SGD is elementwise, so masking the gradient before the step would change
    nothing that this does not already wipe.) Layers with nothing pruned are skipped, so the dense
    level pays nothing, and the multiplies run as two fused ``_foreach`` calls rather than a Python
    loop of small kernels: on small models that loop was a tenth of the step time.
    """

    def __init__(self, params: Dict[str, torch.Tensor], mask: Mask) -> None:
        pruned = [name for name, keep in mask.items() if not bool(keep.all())]
        self.weights = [params[name] for name in pruned]
        self.keeps = [mask[name].to(device=params[name].device, dtype=params[name].dtype) for name in pruned]

    @torch.no_grad()
    def apply(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Zero every pruned weight (and, given the optimizer, its momentum buffer)."""
        if not self.weights:
            return
        torch._foreach_mul_(self.weights, self.keeps)
        if optimizer is None:
            return
        buffers, keeps = [], []
        for weight, keep in zip(self.weights, self.keeps):
            buffer = optimizer.state.get(weight, {}).get("momentum_buffer")
            if buffer is not None:
                buffers.append(buffer)
                keeps.append(keep)
        if buffers:
            torch._foreach_mul_(buffers, keeps)


def zero_pruned(params: Dict[str, torch.Tensor], mask: Mask) -> None:
    """Set every pruned weight to exactly zero."""
    PrunedWeights(params, mask).apply()


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, lr_at: LrAt,
                epoch: int, params: Dict[str, torch.Tensor], mask: Mask, device: torch.device,
                progress: bool = False, task: Optional[Task] = None) -> Tuple[float, float]:
    """One pass over ``loader``; the LR is set per step from ``lr_at(epoch + step / steps)``.

    ``task`` says how a batch feeds the model and what the loss is (default: cross-entropy on logits).
    Returns ``(lr of the first step, mean training loss)``; the loss is NaN or infinite if any step's was.
    """
    model.train()
    task = task or Task()
    steps = len(loader) if hasattr(loader, "__len__") else 0
    pruned = PrunedWeights(params, mask)
    # The loss is summed on the device: a float() per step would make a GPU wait for every batch.
    total_loss, seen, first_lr = torch.zeros((), device=device), 0, lr_at(float(epoch))
    batches = tqdm(loader, total=steps or None, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
    for step, batch in enumerate(batches):
        inputs, labels = split_batch(batch)
        inputs, labels = to_device(inputs, device), labels.to(device, non_blocking=True)
        _set_lr(optimizer, lr_at(epoch + step / steps) if steps else first_lr)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(task.forward(model, inputs), labels)
        loss.backward()
        optimizer.step()
        pruned.apply(optimizer)
        total_loss += loss.detach() * example_count(labels)
        seen += example_count(labels)
    return first_lr, float(total_loss) / max(seen, 1)


def require_finite(loss: float, what: str, when: str) -> None:
    """``DivergedError`` naming ``what`` (``dense``, ``lr-rewind level 3``) and ``when`` if ``loss`` is NaN/inf."""
    if not math.isfinite(loss):
        raise DivergedError(f"{what} diverged: loss {loss} {when}; this level is not saved (finished levels "
                            "are kept); lower --lr (or check the data) and start a new run")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             task: Optional[Task] = None) -> Tuple[float, float]:
    """``(accuracy as a fraction, mean loss)`` on ``loader``; accuracy is NaN for a ``task`` whose
    loss is not a classification loss (argmax accuracy would mean nothing).

    ``reduce`` sums ``[correct, counted, total, loss sum]`` over processes when each scored a slice of the
    test set (``Distributed.sum``), so the result is over the whole test set.
    """
    model.eval()
    task = task or Task()
    correct, counted, total, loss_sum = 0, 0, 0, 0.0
    for batch in loader:
        inputs, labels = split_batch(batch)
        inputs, labels = to_device(inputs, device), labels.to(device)
        output = task.forward(model, inputs)
        loss_sum += float(task.loss(output, labels, reduction="sum"))
        hits, scored = task.correct(output, labels)
        correct, counted, total = correct + hits, counted + scored, total + example_count(labels)
    if reduce is not None:  # float64 holds the counts exactly
        sums = reduce(torch.tensor([correct, counted, total, loss_sum], dtype=torch.float64))
        correct, counted, total, loss_sum = int(sums[0]), int(sums[1]), int(sums[2]), float(sums[3])
    accuracy = correct / max(counted, 1) if task.has_accuracy else float("nan")
    return accuracy, loss_sum / max(total, 1)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, lr_at: LrAt,
          epochs: range, params: Dict[str, torch.Tensor], mask: Mask, device: torch.device,
          on_epoch_end: Optional[EpochHook] = None, progress: bool = False, desc: str = "",
          task: Optional[Task] = None) -> None:
    """Train for ``epochs`` (absolute epoch numbers, which the LR schedule is evaluated at).

    ``on_epoch_end(epoch, first_lr, train_loss)`` runs after every epoch (checkpointing lives there).
    A non-finite training loss stops training with :class:`DivergedError` before that epoch's hook, so
    the last checkpoint written is the last good epoch.
    """
    zero_pruned(params, mask)
    for epoch in tqdm(epochs, desc=desc, leave=False, disable=not progress):
        first_lr, loss = train_epoch(model, optimizer, loader, lr_at, epoch, params, mask, device, progress, task)
        # The epoch's summed loss is NaN/inf if any step's was: one check per epoch, no extra sync.
        require_finite(loss, desc or "training", f"in epoch {epoch + 1} (mean training loss; peak lr {first_lr:g})")
        if on_epoch_end is not None:
            on_epoch_end(epoch, first_lr, loss)
