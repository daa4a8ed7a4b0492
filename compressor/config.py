"""Hyper-parameters of a compression run, as one dataclass whose field metadata is the CLI's help.

The same object configures the Python API (``PruneConfig(target_sparsity=0.9, epochs=10)``) and the
``edgeprune compress`` command, and is saved with the run as ``config.json`` so that ``--resume``
can refuse a run whose hyper-parameters changed (OpenLTH style). Standard library only: the CLI
front imports this module before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from compressor.errors import ConfigError

#: The built-in models' names (compressor.train.models.BUILTIN builds them), here so that `--help` can list
#: them without importing torch.
MODEL_NAMES = ("digits-mlp", "digits-wide-mlp", "digits-cnn", "resnet20", "resnet56")

METHODS = ("lr-rewind", "finetune", "weight-rewind")
SCHEDULES = ("step", "cosine")
STRUCTURES = ("weights", "channels", "blocks", "channels,blocks")  # blocks: compressor.prune.blocks
ALLOCATIONS = ("global", "latency", "global-table")  # compressor.prune.allocation implements them
# The default rounding of kept channel counts (compressor.prune.latency explains the measurement behind it).
DEFAULT_CHANNEL_MULTIPLE = 16
DEFAULT_MIN_CHANNELS = 8
LOSS_NAMES = ("cross-entropy", "mse", "l1")  # compressor.train.batches.LOSSES implements them


def _help(text: str) -> Dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class PruneConfig:
    """Training and pruning hyper-parameters (defaults suit the embedded digits data set)."""

    target_sparsity: float = field(default=0.9, metadata=_help(
        "fraction of the prunable weights to remove in the end, in (0, 1)"))
    prune_fraction: float = field(default=0.2, metadata=_help(
        "fraction of the REMAINING prunable weights removed per round"))
    methods: Tuple[str, ...] = field(default=("lr-rewind",), metadata={"flag": "--method", "help": (
        "retraining method(s), comma separated: lr-rewind, finetune, weight-rewind; several share one "
        "dense training and are plotted together")})
    one_shot: bool = field(default=False, metadata=_help(
        "prune to the target in a single round, then retrain once"))
    exclude: Tuple[str, ...] = field(default=(), metadata=_help(
        "comma separated module names (e.g. fc,conv) whose weights stay dense"))
    layer_floor: float = field(default=0.1, metadata=_help(
        "per-layer floor of global pruning: each prunable layer keeps at least this fraction of the "
        "round's overall density (0.1 at 90% sparsity: 1% of every layer) and at least one weight; "
        "0 = pure global, 1 = uniform"))
    epochs: int = field(default=30, metadata=_help("epochs of the (dense) training schedule"))
    batch_size: int = field(default=64, metadata=_help("mini-batch size"))
    loss: str = field(default="cross-entropy", metadata=_help(
        "training loss: cross-entropy (integer labels; accuracy reported), mse or l1 (accuracy is NaN); "
        "a data factory may return its own loss callable instead"))
    output: Optional[str] = field(default=None, metadata=_help(
        "which model output the loss (and export) uses: a dict/ModelOutput key or a tuple position "
        "(default: logits if the model returns it, else the first tensor)"))
    lr: float = field(default=0.1, metadata=_help("peak learning rate of SGD"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=_help("SGD weight decay (L2)"))
    schedule: str = field(default="step", metadata=_help(
        "learning-rate schedule after warmup: step (drops by --gamma at --lr-drops) or cosine"))
    lr_drops: Optional[Tuple[int, ...]] = field(default=None, metadata=_help(
        "comma separated epochs where the step schedule multiplies the LR by --gamma, or none "
        "(default: half and three quarters of --epochs)"))
    gamma: float = field(default=0.1, metadata=_help("factor of each step drop"))
    warmup_epochs: int = field(default=0, metadata=_help("epochs of linear warmup from 0 to --lr"))
    rewind_epoch: int = field(default=1, metadata=_help(
        "weight-rewind only: the dense-training epoch whose weights surviving weights are reset to"))
    seed: int = field(default=0, metadata=_help("random seed (initialisation, shuffling, augmentation)"))
    structure: str = field(default="weights", metadata=_help(
        "what a round removes: weights (unstructured, a sparse model), channels (whole filters and "
        "neurons with every coupled tensor: a smaller dense model that every runtime runs faster), blocks "
        "(whole residual blocks with an identity shortcut, replaced by that shortcut: fewer layers, what "
        "passes the per-layer floor at batch 1) or channels,blocks (block levels first, as many as the "
        "channels alone cannot reach the target without, then channel rounds)"))
    blocks_per_level: int = field(default=1, metadata=_help(
        "blocks only: residual blocks one level removes (the weakest by --criterion block-norm); the "
        "level that reaches the target removes only as many as it needs"))
    target_macs: Optional[float] = field(default=None, metadata=_help(
        "channels only: fraction of multiply-accumulates to remove in the end, in (0, 1); when given "
        "it replaces --target-sparsity (which, for channels, counts all parameters removed)"))
    channel_multiple: Optional[int] = field(default=None, metadata=_help(
        "channels only: kept channel counts are rounded to multiples of this (CPU kernels work in "
        "blocks of 8/16 channels); 1 = exact. Default: multiples of 16, 8 as the narrowest in 16-wide "
        "groups (measured on resnet20 at 128x128: 0.82-0.86 of the MAC ratio as speed-up at 50% MACs "
        "removed, against 0.60 for multiples of 8; 0.72-0.88 at 70%)"))
    min_channels: Optional[int] = field(default=None, metadata=_help(
        "channels only: the narrowest a layer may get (default: --channel-multiple); below the "
        "multiple it allows one narrower width in groups no wider than the multiple, e.g. "
        "--channel-multiple 16 --min-channels 8 keeps a 16-wide group at 8 or 16 and a 64-wide one "
        "at 16, 32, 48 or 64 (a conv with 8 outputs runs at half the MAC rate of one with 16 on x86)"))
    criterion: Optional[str] = field(default=None, metadata=_help(
        "how a round ranks what it removes: magnitude (weights), l1-norm or bn-scale (channels), "
        "block-norm (blocks: ||F(x)||/||x|| of the residual branch on the first test batch); default: "
        "magnitude for weights, l1-norm for channels, block-norm for blocks"))
    allocate: str = field(default="global", metadata=_help(
        "channels only: how a round decides how many channels each layer keeps: global (the lowest "
        "criterion scores anywhere), latency (least importance lost per millisecond saved) or "
        "global-table (global, each width rounded to the nearest one that is faster than the next "
        "wider); the last two use onnxruntime times of every layer shape, measured on this machine "
        "or read from --latency-table"))
    target_speedup: Optional[float] = field(default=None, metadata=_help(
        "--allocate latency/global-table only: prune until the latency table predicts this speed-up over the dense "
        "model (e.g. 1.8); replaces --target-sparsity and --target-macs"))
    target_latency: Optional[float] = field(default=None, metadata=_help(
        "--allocate latency/global-table only: prune until the network measures at most this many "
        "milliseconds (batch 1) where the latency is measured; replaces the other targets"))
    quantize: Optional[str] = field(default=None, metadata=_help(
        "the engine the pruned model will be exported for: int8 plans widths from int8 (static QDQ) "
        "times and times candidates quantized (export it with --quantize int8); default fp32"))
    latency_threads: int = field(default=1, metadata=_help(
        "intra-op threads the model will run with: latency tables and network timings use this many"))
    latency_table: Optional[str] = field(default=None, metadata=_help(
        "--allocate latency/global-table only: a latency table JSON measured elsewhere (e.g. on the Pi with "
        "python3 -m edge_runtime.layer_timing) instead of measuring on this machine"))

    def __post_init__(self) -> None:
        # Lists from JSON or the API become tuples, so equal configs compare equal.
        for name in ("methods", "exclude", "lr_drops"):
            value = getattr(self, name)
            if isinstance(value, str):  # "none" (or "") is the empty list: no LR drops, no exclusions
                value = tuple(part.strip() for part in value.split(",") if part.strip() not in ("", "none"))
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.lr_drops is None:
            object.__setattr__(self, "lr_drops", (self.epochs // 2, self.epochs * 3 // 4))
        try:
            object.__setattr__(self, "lr_drops", tuple(int(e) for e in self.lr_drops))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"--lr-drops must be comma separated epochs, got {self.lr_drops!r}") from error
        if isinstance(self.channel_multiple, str):
            try:
                object.__setattr__(self, "channel_multiple", int(self.channel_multiple))
            except ValueError as error:
                raise ConfigError(f"--channel-multiple must be an integer, got {self.channel_multiple!r}") from error
        if isinstance(self.min_channels, str):
            try:
                object.__setattr__(self, "min_channels", int(self.min_channels))
            except ValueError as error:
                raise ConfigError(f"--min-channels must be an integer, got {self.min_channels!r}") from error
        if isinstance(self.target_speedup, str):
            try:
                object.__setattr__(self, "target_speedup", float(self.target_speedup))
            except ValueError as error:
                raise ConfigError(f"--target-speedup must be a number > 1, got {self.target_speedup!r}") from error
        if isinstance(self.target_latency, str):
            try:
                object.__setattr__(self, "target_latency", float(self.target_latency))
            except ValueError as error:
                raise ConfigError(f"--target-latency must be milliseconds > 0, got {self.target_latency!r}") from error
        if isinstance(self.target_macs, str):  # the CLI hands optional numbers over as text
            try:
                object.__setattr__(self, "target_macs", float(self.target_macs))
            except ValueError as error:
                raise ConfigError(f"--target-macs must be a number in (0, 1), got {self.target_macs!r}") from error
        self._validate()

    def _validate(self) -> None:
        if not 0.0 < self.target_sparsity < 1.0:
            raise ConfigError(f"target sparsity must be in (0, 1), got {self.target_sparsity}")
        if not 0.0 <= self.layer_floor <= 1.0:
            raise ConfigError(f"layer floor must be in [0, 1], got {self.layer_floor}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ConfigError(f"prune fraction must be in (0, 1), got {self.prune_fraction}")
        if not self.methods:
            raise ConfigError("give at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"method listed twice: {','.join(self.methods)}")
        if self.loss not in LOSS_NAMES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSS_NAMES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be at least 1")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or self.gamma <= 0:
            raise ConfigError("lr and gamma must be > 0, momentum and weight decay >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if list(self.lr_drops) != sorted(self.lr_drops) or any(e < 0 for e in self.lr_drops):
            raise ConfigError(f"--lr-drops must be increasing epochs >= 0, got {self.lr_drops}")
        if any(e >= self.epochs for e in self.lr_drops):
            raise ConfigError(f"--lr-drops {','.join(map(str, self.lr_drops))} would never happen in "
                              f"{self.epochs} epochs; give drops below --epochs")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup epochs must be in [0, epochs), got {self.warmup_epochs}")
        if "weight-rewind" in self.methods and not 0 <= self.rewind_epoch < self.epochs:
            raise ConfigError(f"rewind epoch must be in [0, epochs={self.epochs}), got {self.rewind_epoch}")
        self._validate_structure()
        self._validate_latency()

    @property
    def structured(self) -> bool:
        """Whether levels remove whole structures (channels and/or blocks) rather than single weights."""
        return self.structure != "weights"

    @property
    def removes_channels(self) -> bool:
        return "channels" in self.structure.split(",")

    @property
    def removes_blocks(self) -> bool:
        return "blocks" in self.structure.split(",")

    def _validate_structure(self) -> None:
        if self.structure == "blocks,channels":  # one spelling, so equal configs compare equal on --resume
            object.__setattr__(self, "structure", "channels,blocks")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"unknown structure {self.structure!r}; choose from {', '.join(STRUCTURES)}")
        if self.target_macs is not None:
            if not self.structured:
                raise ConfigError("--target-macs needs --structure channels or blocks (unstructured zeros remove no MACs "
                                  "that a dense runtime skips)")
            if not 0.0 < self.target_macs < 1.0:
                raise ConfigError(f"target MACs must be in (0, 1), got {self.target_macs}")
        if self.channel_multiple is not None and not 1 <= self.channel_multiple <= 1024:
            raise ConfigError(f"--channel-multiple must be in [1, 1024], got {self.channel_multiple}")
        multiple = self.channel_multiple or DEFAULT_CHANNEL_MULTIPLE
        if self.min_channels is not None and not 1 <= self.min_channels <= multiple:
            raise ConfigError(f"--min-channels must be in [1, --channel-multiple], got {self.min_channels}")
        if self.allocate not in ALLOCATIONS:
            raise ConfigError(f"unknown --allocate {self.allocate!r}; choose from {', '.join(ALLOCATIONS)}")
        if self.blocks_per_level < 1:
            raise ConfigError(f"--blocks-per-level must be at least 1, got {self.blocks_per_level}")
        if self.allocate != "global" and not self.removes_channels:
            raise ConfigError(f"--allocate {self.allocate} needs --structure channels")
        if self.latency_table is not None and self.allocate == "global" and not self.removes_blocks:
            raise ConfigError("--latency-table needs --allocate latency or global-table (or --structure blocks)")
        if self.target_speedup is not None:
            if self.allocate == "global" and not self.removes_blocks:
                raise ConfigError("--target-speedup needs --allocate latency or global-table, or --structure "
                                  "blocks (the speed-up is predicted from the latency table)")
            if self.target_macs is not None:
                raise ConfigError("give --target-speedup or --target-macs, not both")
            if not 1.0 < self.target_speedup <= 1000.0:
                raise ConfigError(f"--target-speedup must be in (1, 1000], got {self.target_speedup}")

    def _validate_latency(self) -> None:
        if self.quantize == "none":  # the CLI's (and bench's) spelling of the default
            object.__setattr__(self, "quantize", None)
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"--quantize {self.quantize!r}: plan for int8 or leave it out (fp32)")
        if not 1 <= self.latency_threads <= 64:
            raise ConfigError(f"--latency-threads must be in [1, 64], got {self.latency_threads}")
        if self.target_latency is None:
            return
        if self.allocate == "global" and not self.removes_blocks:
            raise ConfigError("--target-latency needs --allocate latency or global-table, or --structure blocks "
                              "(the latency is predicted from the latency table)")
        if self.target_macs is not None or self.target_speedup is not None:
            raise ConfigError("give one of --target-latency, --target-speedup, --target-macs")
        if not 0.0 < self.target_latency < 1e6:
            raise ConfigError(f"--target-latency must be milliseconds in (0, 1e6), got {self.target_latency}")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PruneConfig":
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error (a newer/other format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - names
        if extra:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(extra))}")
        return cls(**data)


# Per-model training defaults for the built-in models (the CLI applies them under explicit flags).
# ResNets follow the paper: 182 epochs, batch 128, LR 0.1 ×0.1 at 91 and 136, wd 2e-4.
PRESETS: Dict[str, Dict[str, Any]] = {
    "digits-mlp": {"epochs": 30, "batch_size": 64, "lr": 0.1, "weight_decay": 1e-4},
    "digits-cnn": {"epochs": 30, "batch_size": 64, "lr": 0.1, "weight_decay": 1e-4},
    "resnet20": {"epochs": 182, "batch_size": 128, "lr": 0.1, "weight_decay": 2e-4,
                 "lr_drops": (91, 136), "rewind_epoch": 3},
    "resnet56": {"epochs": 182, "batch_size": 128, "lr": 0.1, "weight_decay": 2e-4,
                 "lr_drops": (91, 136), "rewind_epoch": 3},
}


def config_for(model_name: str, **overrides: Any) -> PruneConfig:
    """The model's preset (if it has one) with ``overrides`` on top; ``None`` overrides are ignored.

    A shorter (or longer) ``epochs`` than the preset's keeps the preset's LR drops at the same
    fractions of training: ``--model resnet20 --epochs 10`` drops at epochs 5 and 7, not 91 and 136.
    """
    preset = PRESETS.get(model_name, {})
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**preset, **given}
    if "epochs" in given and "lr_drops" not in given and "lr_drops" in preset:
        scale = given["epochs"] / preset["epochs"]
        values["lr_drops"] = tuple(int(drop * scale) for drop in preset["lr_drops"])
    return PruneConfig(**values)


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Human-readable ``key: old -> new`` lines for every key whose value differs."""
    # Round-trip through JSON so tuples/lists and ints/floats compare as they were saved.
    current = json.loads(json.dumps(current))
    # A key added to PruneConfig after a run was saved (layer_floor, structure, loss, ...) is no
    # difference while it holds its default: older runs still resume.
    defaults = json.loads(json.dumps(PruneConfig().to_dict()))
    saved = {**{k: v for k, v in defaults.items() if k not in saved and current.get(k) == v}, **saved}
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
