"""``compress()``: train (or load) the dense network, then prune and retrain level by level.

Every level is a folder of RUN_DIR with a per-epoch ``checkpoint.pt`` and a ``final.pt``; a level
whose ``final.pt`` exists is skipped, and a level with a ``checkpoint.pt`` continues from it with its
model, optimizer and random states restored, so a resumed run ends exactly where an uninterrupted
one would. Each level also starts from random states derived from (seed, method, level), which makes
a level's result independent of which process ran the levels before it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compressor import checkpoints
from compressor.prune.levels import ChannelLevels, Plan
from compressor.prune.examples import first_example
from compressor.prune.latency import LatencySource
from compressor.train.batches import Task, call_model, example_inputs, split_batch, to_device
from compressor.config import PruneConfig
from compressor.train.devices import resolve_device
from compressor.train.distributed import Distributed, current, require_shared
from compressor.errors import ConfigError
from compressor.prune.criteria import criteria_for
from compressor.prune.mask import Mask
from compressor.train.methods import RetrainPlan, any_rewinds_weights, dense_plan, method_named
from compressor.train.models import input_shape_of
from compressor.train.optimizers import build_optimizer
from compressor.prune.weights import (dense_leftovers, keep_counts, layer_sparsities, model_sparsity,
                                      prunable_parameters, weight_sparsity)
from compressor.run.report import warn_thin_layers, write_metrics, write_report
from compressor.run.run_dir import CONFIG, RunDir, collect_metrics, model_fields
from compressor.train.training import evaluate, require_finite, train, zero_pruned

log = logging.getLogger("compressor")
EpochCallback = Callable[[str, int, int], None]
DENSE = "dense"


@dataclass
class CompressResult:
    """What :func:`compress` returns.

    ``model`` is the model you passed, now holding the last level of the first method (with
    ``--structure channels``: a new, smaller module of the same class, the dense one passed in untouched
    apart from its dense training);
    ``metrics`` is metrics.json's content; ``run_dir`` is ``None`` when no ``out`` was given.
    """

    model: nn.Module
    metrics: Dict[str, Any]
    run_dir: Optional[Path]

    def final(self, method: Optional[str] = None) -> Dict[str, Any]:
        """The last level's metrics for ``method`` (default: the first method)."""
        method = method or next(iter(self.metrics["methods"]))
        return self.metrics["methods"][method][-1]


def compress(model: nn.Module, train_loader: Iterable, test_loader: Iterable, config: PruneConfig,
             out: Union[str, Path, None] = None, *, resume: bool = False, device: str = "auto",
             model_name: Optional[str] = None, data_name: str = "custom",
             pretrained: Optional[Dict[str, torch.Tensor]] = None, progress: Optional[bool] = None,
             epoch_callback: Optional[EpochCallback] = None, loss_fn: Optional[Callable] = None,
             latency_source: Optional[LatencySource] = None) -> CompressResult:
    """Iteratively prune ``model`` to ``config.target_sparsity`` and retrain it after every round.

    ``config.structure == "channels"`` removes whole channels instead of single weights (until
    ``config.target_macs`` or the fraction of parameters ``target_sparsity`` is removed; see
    ``compressor.prune.levels``); the model must declare or let us peek its input shape.

    Args:
        model: the network (trained in place). Seed torch before building it for reproducible runs.
        train_loader, test_loader: iterables of ``(inputs, labels)`` batches (``compressor.train.data``
            has in-memory loaders; a torch ``DataLoader`` works too).
        config: hyper-parameters; ``PruneConfig()`` suits small models, see ``compressor.config``.
        out: RUN_DIR for checkpoints and results; a temporary folder (deleted afterwards) if None.
        resume: continue the run in ``out``; refused if ``out``'s config differs.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        model_name, data_name: recorded in config.json/metrics.json (``model_name`` should be a
            registry name or ``file.py:factory`` so ``load_level`` can rebuild the model).
        pretrained: a trained state_dict to start from instead of dense training.
        progress: tqdm bars (levels and epochs) on stderr; None (the default): bars on a terminal, else
            one plain line per level on stderr (a notebook's log or a pipe sees the run is alive); False:
            nothing.
        epoch_callback: called as ``(method, level, epoch)`` after each epoch's checkpoint.
        loss_fn: ``loss(output, target) -> scalar`` replacing ``config.loss`` (e.g. a data factory's).
        latency_source: where latency tables and candidate networks are timed (default: this machine,
            ``compressor.prune.latency.LocalLatency``; the ``edgeprune`` front passes a remote one).

    Batches are ``(inputs, target)`` with inputs a tensor, tuple or dict (``compressor.train.batches``). One
    forward on one batch of each loader runs first: a model or data the compressor cannot drive is a
    ConfigError before anything is trained or written.

    Under ``torch.distributed`` (an initialised process group, e.g. ``edgeprune compress`` under
    torchrun) every rank calls this with the same arguments: training runs data-parallel on
    in-memory data (``compressor.train.data`` loaders), the batch size stays the global one, and only
    rank 0 writes ``out`` (see ``compressor.train.distributed``).
    """
    lines = progress is None and not sys.stderr.isatty()  # a pipe or a log: plain lines, not bars
    progress = sys.stderr.isatty() if progress is None else progress
    ranks = current(resolve_device(device))  # torchrun's process group, or this process alone
    torch_device = ranks.device
    if ranks.active and out is None:
        raise ConfigError("a distributed run needs out=RUN_DIR, on a filesystem every process sees")
    if pretrained is not None and any_rewinds_weights(config.methods):
        raise ConfigError("weight-rewind needs the dense training's early weights; it cannot start from --pretrained")
    criteria = criteria_for(config.criterion, config.structure)
    criterion = criteria[config.structure.split(",")[0]]
    if pretrained is not None:  # before RUN_DIR is touched: a checkpoint that does not fit writes nothing
        checkpoints.load_into(model, pretrained, "--pretrained")
    params = prunable_parameters(model, config.exclude)  # also checks --exclude's names
    leftovers = None if config.structure == "channels" else dense_leftovers(model, params)
    if leftovers and ranks.is_main:
        log.warning(leftovers)
    shape = input_shape_of(model) or _peek_input_shape(test_loader)
    model.to(torch_device)
    task = Task(config.loss, config.output, loss_fn)  # how a batch feeds the model; one probe per loader
    task.probe(model, train_loader, torch_device, "training data")
    task.probe(model, test_loader, torch_device, "test data")
    if ranks.is_main:
        _warn_unless_exportable(model, test_loader, config.output)
    # traced on a real batch (after the probes: a batch that does not fit is the probe's one line)
    channels = _channel_levels(model, shape, config, criteria, test_loader, latency_source)  # before RUN_DIR is touched
    counts = [] if channels else keep_counts(sum(p.numel() for p in params.values()), config.prune_fraction,
                                             config.target_sparsity, config.one_shot)
    params = prunable_parameters(model, config.exclude)  # the parameters as they live on the device
    trainable = ranks.wrap(model)  # DistributedDataParallel under torchrun; shares model's parameters
    record = {**model_fields(model_name or type(model).__name__), "data": data_name,
              "pretrained": pretrained is not None, "input_shape": list(shape) if shape else None,
              **config.to_dict()}
    with contextlib.ExitStack() as stack:
        root = Path(out) if out is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run = RunDir(root, writer=ranks.is_main)
        _prepare(run, record, resume, ranks)  # read-only checks first: a refused folder is never written to
        stack.enter_context(run.hold())
        stack.enter_context(log_lines_to_stderr(lines and ranks.is_main))
        if resume:
            run.remove_stale_temp_files()
        if channels:
            channels.attach_rounding(run.root, ranks.is_main, ranks.barrier)
            channels.attach_table(run.root, ranks.is_main, ranks.barrier)
            channels.feed = _first_batch_feed(test_loader)
        stack.enter_context(_deterministic(torch_device))
        progress = progress and ranks.is_main
        job = _Job(run, model, {} if channels else params, ranks.shard(train_loader, train=True),
                   ranks.shard(test_loader, train=False), config, torch_device, progress, epoch_callback, ranks,
                   trainable, task)
        job.counts, job.criterion, job.channels = counts, criterion, channels
        job.test_examples = _example_count(test_loader)  # the whole test set, before any sharding
        bar = stack.enter_context(tqdm(total=1 + len(config.methods) * len(counts) if counts else None,
                                       desc="levels", disable=not progress))
        job.dense(pretrained)
        bar.update()
        last_levels = {}
        for method in config.methods:
            level, last = 0, False
            while not last:
                level += 1
                bar.set_postfix_str(f"{method} {level}" + (f"/{len(counts)}" if counts else ""))
                last = job.level(method, level)
                bar.update()
            last_levels[method] = level
        metrics = collect_metrics(run, job.records)
        write_metrics(run, metrics)
        write_report(run, metrics)
        final = checkpoints.load(run.final_path(config.methods[0], last_levels[config.methods[0]]))
        if channels:  # a smaller network than the one passed in: a new module
            model = channels.build(channels.stored_plan(final, "the last level"), final["model"],
                                   "the last level").to(torch_device)
        else:
            checkpoints.load_into(model, final["model"], "the last level")
        return CompressResult(model, metrics, Path(out) if out is not None else None)


def _streams_to_terminal(logger: logging.Logger) -> bool:
    """Whether a handler of ``logger`` or its ancestors already writes to stderr or stdout."""
    while logger is not None:
        if any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
               for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


@contextlib.contextmanager
def log_lines_to_stderr(enabled: bool) -> Iterator[None]:
    """While compressing, send the compressor's progress lines (logging INFO: one per level) to stderr,
    one plain line each; afterwards the logger is as it was. Records still propagate (a program's own
    handlers, pytest's caplog see them); a program that already streams logging to the terminal
    (``logging.basicConfig``) decides itself, so nothing is printed twice."""
    logger = logging.getLogger("compressor")
    if not enabled or _streams_to_terminal(logger):
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def _channel_levels(model: nn.Module, shape: Optional[Tuple[int, ...]], config: PruneConfig,
                    criteria: Dict[str, Any], test_loader: Iterable,
                    source: Optional[LatencySource] = None) -> Optional[ChannelLevels]:
    """The structured side of the run (None for --structure weights); traces the model now, on the first
    example of the test data (token ids, several or keyword inputs as they come), so an untraceable
    model is refused before anything is written or trained."""
    if not config.structured:
        return None
    inputs, _ = split_batch(next(iter(test_loader)))  # the probe has read one already
    example = first_example(inputs)
    return ChannelLevels(model, shape, config, criteria.get("channels"), source, criteria.get("blocks"),
                         example=example)


def _warn_unless_exportable(model: nn.Module, test_loader: Iterable, output: Optional[str]) -> None:
    """One warning line before training when torch cannot export the model to ONNX on a real batch, so
    the user can stop before paying for training a model `edgeprune export` will refuse. A warning, not
    a refusal: the compressed PyTorch model is still worth having."""
    from compressor.errors import ExportError
    from compressor.export.model_dir import check_exportable

    inputs, _ = split_batch(next(iter(test_loader)))
    try:
        check_exportable(model, first_example(inputs), output)
    except ExportError as error:
        reason = (str(error).strip().splitlines() or [""])[0][:240]
        log.warning(f"warning: this model cannot be exported to ONNX ({reason}); `edgeprune export` "
                    "will refuse the compressed model: stop now (Ctrl-C) and fix the model first")


def _first_batch_feed(test_loader: Iterable, count: int = 128) -> Callable[[nn.Module], object]:
    """Runs a model on the first ``count`` examples of the (unshuffled) test data: the real batch that
    block criteria score activations on, the same in a resumed run and on every torchrun rank."""
    inputs = example_inputs(split_batch(next(iter(test_loader)))[0], count)

    def feed(model: nn.Module) -> object:
        device = next(model.parameters()).device
        return call_model(model, to_device(inputs, device))
    return feed


class _Job:
    """One run's state shared by its levels (model, loaders, where files go)."""

    def __init__(self, run: RunDir, model: nn.Module, params: Dict[str, torch.Tensor], train_loader: Iterable,
                 test_loader: Iterable, config: PruneConfig, device: torch.device, progress: bool,
                 epoch_callback: Optional[EpochCallback], ranks: Optional[Distributed] = None,
                 trainable: Optional[nn.Module] = None, task: Optional[Task] = None) -> None:
        self.run, self.model, self.params = run, model, params
        self.task = task or Task(config.loss, config.output)
        self.ranks = ranks if ranks is not None else Distributed(device=device)
        # What the training loop calls: the model, or DistributedDataParallel around it.
        self.trainable = trainable if trainable is not None else model
        self.train_loader, self.test_loader = train_loader, test_loader
        self.config, self.device, self.progress = config, device, progress
        self.epoch_callback = epoch_callback
        self.records: Dict[Path, Dict[str, Any]] = {}  # metrics.json's level records, read once each
        self.warned: set = set()  # (method, layer) pairs already warned about as nearly pruned away
        generator = getattr(train_loader, "generator", None)
        self.generators: List[torch.Generator] = [generator] if isinstance(generator, torch.Generator) else []
        self.steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else 1
        self.counts: List[int] = []  # weights: surviving weights after each round (compress() sets these)
        self.criterion: Any = None
        self.channels: Optional[ChannelLevels] = None  # channels/blocks: the structured side of the run
        self.plan: Optional[Plan] = None  # structured: this level's plan
        self.test_examples: Optional[int] = None  # the whole test set's size (compress() sets it)
        self.extra: Dict[str, Any] = {}  # what this level's checkpoints and final.pt add (its plan)

    def dense(self, pretrained: Optional[Dict[str, torch.Tensor]]) -> None:
        """Level 0: train the dense network (saving the rewind snapshot on the way) or load it."""
        if self.run.final_path(DENSE, 0).is_file():
            return
        mask = Mask.ones_like(self.params).to(self.device)
        if self.channels is not None:  # the example it traced with: readers rebuild the levels with it
            self.plan = self.channels.dense_plan()
            self.extra = {**self.plan.stored(), "last": False, "example": self.channels.example}
        if pretrained is not None:  # already loaded into the model by compress()
            began = time.perf_counter()
            self._finish(DENSE, 0, mask, epochs=0, seconds=time.perf_counter() - began, lrs=[])
            return
        if any_rewinds_weights(self.config.methods) and self.config.rewind_epoch == 0 and \
                not self.run.rewind_path.is_file():
            self.run.save({"model": _cpu_state(self.model)}, self.run.rewind_path)
        self._train(DENSE, 0, dense_plan(self.config), mask)

    def level(self, method: str, level: int) -> bool:
        """Prune the previous level one round and retrain with ``method`` (unless done); returns
        whether this level is the method's last."""
        if self.channels is not None:
            return self._channel_level(method, level)
        if not self.run.final_path(method, level).is_file():
            plan = method_named(method).plan(self.config, self.steps_per_epoch)
            previous = checkpoints.load(self.run.final_path(method, level - 1))
            checkpoints.load_into(self.model, previous["model"], str(self.run.final_path(method, level - 1)))
            mask = self.criterion.prune(self.params, Mask(previous["mask"]).to(self.device), self.counts[level - 1],
                                        floor=self.config.layer_floor)
            if plan.rewind_weights:
                rewind = checkpoints.load(self.run.rewind_path)
                checkpoints.load_into(self.model, rewind["model"], str(self.run.rewind_path))
            zero_pruned(self.params, mask)
            self._train(method, level, plan, mask)
        return level == len(self.counts)

    def _channel_level(self, method: str, level: int) -> bool:
        """Structured: remove the next round's channels or blocks physically, then retrain the smaller network."""
        channels, done = self.channels, self.run.final_path(method, level)
        if done.is_file():
            return bool(checkpoints.load(done).get("last", True))
        plan = method_named(method).plan(self.config, self.steps_per_epoch)
        source = self.run.final_path(method, level - 1)
        previous = checkpoints.load(source)
        current = channels.stored_plan(previous, str(source))
        model = channels.build(current, previous["model"], str(source)).to(self.device)
        started = self.run.checkpoint_path(method, level)
        if started.is_file():  # an interrupted level keeps the plan it started with (timings may differ now)
            saved = checkpoints.load(started)
            kept, last = channels.stored_plan(saved, str(started)), bool(saved.get("last", False))
        else:
            kept, last = channels.next_plan(model, current)
        if plan.rewind_weights:  # the rewind snapshot, sliced to the surviving channels
            rewind = checkpoints.load(self.run.rewind_path)
            model = channels.build(kept, rewind["model"], str(self.run.rewind_path), state_is_dense=True)
        else:
            model = channels.shrink_to(model, current, kept)
        self._use(model.to(self.device))
        self.plan = kept
        self.extra = {**kept.stored(), "last": last, "example": channels.example}
        self._train(method, level, plan, Mask({}))
        return last

    def _use(self, model: nn.Module) -> None:
        """Train ``model`` from now on (structured levels build a new, smaller one each round)."""
        self.model = model
        self.trainable = self.ranks.wrap(model)

    def _train(self, method: str, level: int, plan: RetrainPlan, mask: Mask) -> None:
        """Run ``plan`` for one level, checkpointing every epoch, then write its ``final.pt``."""
        config, run = self.config, self.run
        checkpoint_path = run.checkpoint_path(method, level)
        optimizer = build_optimizer(self.model, config)
        lrs: List[float] = []
        seconds_before, start = 0.0, plan.epochs.start
        if checkpoint_path.is_file():
            saved = checkpoints.load(checkpoint_path)
            checkpoints.load_into(self.model, saved["model"], str(checkpoint_path))
            optimizer.load_state_dict(saved["optimizer"])
            mask = Mask(saved["mask"]).to(self.device)
            checkpoints.restore_rng(saved["rng"], self.generators)
            lrs, seconds_before, start = list(saved["lrs"]), float(saved["seconds"]), int(saved["epoch"]) + 1
        else:
            _seed_everything(_level_seed(config.seed, method, level), self.generators)
        began = time.perf_counter()

        def on_epoch_end(epoch: int, lr: float, _loss: float) -> None:
            lrs.append(lr)
            if level == 0 and any_rewinds_weights(config.methods) and epoch + 1 == config.rewind_epoch:
                run.save({"model": _cpu_state(self.model)}, run.rewind_path)
            run.save({"model": _cpu_state(self.model), "optimizer": optimizer.state_dict(),
                      "mask": mask.state_dict(), "epoch": epoch, "rng": checkpoints.capture_rng(self.generators),
                      "lrs": list(lrs), "seconds": seconds_before + time.perf_counter() - began,
                      "config": config.to_dict(), **self.extra}, checkpoint_path)
            if self.epoch_callback is not None:
                self.epoch_callback(method, level, epoch)

        desc = "dense" if level == 0 else f"{method} level {level}"
        train(self.trainable, optimizer, self.train_loader, plan.lr_at, range(start, plan.epochs.stop), self.params,
              mask, self.device, on_epoch_end, self.progress, desc, self.task)
        self._finish(method, level, mask, epochs=len(plan.epochs),
                     seconds=seconds_before + time.perf_counter() - began, lrs=lrs)

    def _finish(self, method: str, level: int, mask: Mask, epochs: int, seconds: float, lrs: List[float]) -> None:
        """Evaluate, write the level's ``final.pt``, drop its epoch checkpoint, refresh metrics.json.

        ``final.pt`` holds no optimizer state: every level starts a fresh optimizer (the schedule is
        replayed), so only the per-epoch ``checkpoint.pt`` needs it for resuming — and it is deleted here.
        """
        began = time.perf_counter()
        self.ranks.broadcast_state(self.model)  # every rank evaluates exactly what rank 0 saves
        # Structured levels have no mask: every rank must have derived the same channel plan instead.
        mask_checksums = self.ranks.agree("masks", mask) if self.channels is None else \
            self.ranks.agree("channel plans", self.extra["channels"])
        accuracy, loss = evaluate(self.model, self.test_loader, self.device, reduce=self.ranks.sum, task=self.task)
        require_finite(loss, "dense" if level == 0 else f"{method} level {level}", "after training (test loss)")
        final = {
            "model": _cpu_state(self.model), "mask": mask.state_dict(), "level": level,
            "method": method, "sparsity": weight_sparsity(self.params), "accuracy": accuracy, "loss": loss,
            "epochs": epochs, "seconds": seconds + time.perf_counter() - began, "lrs": lrs,
            "sparsity_all": model_sparsity(self.model),  # beside the prunable weights' own, named so
            "layers": layer_sparsities(self.params), "config": self.config.to_dict(),
            "world_size": self.ranks.world_size, "mask_sha256": mask_checksums, **self.extra,
        }
        if self.test_examples and self.task.has_accuracy:  # how far one example moves the accuracy
            final["test_examples"] = self.test_examples
        if self.channels is not None:  # params, MACs, widths; sparsity = fraction of the parameters removed
            final.update(self.channels.describe(self.model, self.plan))
            final["layers"] = final["widths"]
            del final["sparsity_all"]  # a smaller network: "sparsity" already counts all its parameters
        self.run.save(final, self.run.final_path(method, level))
        self.run.remove(self.run.checkpoint_path(method, level))
        if self.run.writer:
            write_metrics(self.run, collect_metrics(self.run, self.records))
            accuracy_text = "no accuracy" if accuracy != accuracy else f"accuracy {accuracy:.2%}"
            sparsity = f"sparsity {final['sparsity']:.2%}" + (
                "" if self.channels is not None else
                f" of the prunable weights ({final['sparsity_all']:.2%} of all parameters)")
            log.info(f"{'dense' if level == 0 else f'{method} level {level}'} done: {sparsity}, "
                     f"{accuracy_text}, loss {loss:.4f}, {epochs} epochs in {final['seconds']:.0f} s")
            if self.channels is None:  # structured levels' "layers" are widths, never nearly empty
                warn_thin_layers(method, level, final["layers"], self.warned)
        self.ranks.barrier()  # the next level reads this final.pt on every rank


def _prepare(run: RunDir, record: Dict[str, Any], resume: bool, ranks: Distributed) -> None:
    """``run.prepare``; under torchrun every rank checks RUN_DIR before rank 0 writes into it (so all
    ranks refuse or accept alike), then every rank must see what rank 0 wrote."""
    if not ranks.active:
        run.prepare(record, resume)
        return
    RunDir(run.root, writer=False).prepare(record, resume)
    ranks.barrier()
    if ranks.is_main:
        run.prepare(record, resume)
    ranks.barrier()
    require_shared(run.root / CONFIG, ranks.rank)


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return checkpoints.cpu_state(model)  # keeps the state_dict's _metadata (module versions)


def _level_seed(seed: int, method: str, level: int) -> int:
    # A stable hash (Python's hash() is salted per process) so every process derives the same seed.
    return zlib.crc32(f"{seed}/{method}/{level}".encode()) & 0x7FFFFFFF


def _seed_everything(seed: int, generators: List[torch.Generator]) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    for generator in generators:
        generator.manual_seed(seed)


def _example_count(loader: Iterable) -> Optional[int]:
    """How many examples the test loader holds (a torch DataLoader's dataset, the in-memory
    TensorLoader's labels), or None when it cannot say."""
    held = getattr(loader, "dataset", None)
    held = getattr(loader, "labels", None) if held is None else held
    try:
        count = len(held)  # type: ignore[arg-type]
    except TypeError:
        return None
    return count if isinstance(count, int) and count > 0 else None


def _peek_input_shape(loader: Iterable) -> Optional[Tuple[int, ...]]:
    """One example's shape from the (unshuffled) test loader, for models that declare none."""
    try:
        inputs, _ = next(iter(loader))
        return tuple(int(d) for d in inputs.shape[1:])
    except Exception:  # a loader we cannot peek at just leaves the shape unrecorded
        return None


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on the CPU (cheap there); the caller's setting is restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
