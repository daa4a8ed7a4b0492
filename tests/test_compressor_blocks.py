"""--structure blocks / channels,blocks: a removed residual block is its identity path (outputs keep their
shape, equal to the network with that branch zeroed), nothing outside a removable block goes, a level
with blocks removed loads and exports to the trained model, a SIGKILLed run resumes to the same result,
and a model without a removable block is one line and exit 2."""

from __future__ import annotations

import copy
import json
import signal
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compressor.config import PruneConfig
from compressor.prune.blocks import PRUNABLE, find_blocks, remove_blocks, removed_layers
from compressor.prune.examples import example_input
from compressor.prune.latency import LatencyModel
from compressor.prune.levels import ChannelLevels
from compressor.train.models import build_model
from edge_runtime.layer_timing import LatencyTable
from tests.compressor_fixtures import ENV, TEMP_ROOT, cli, compress_killed_at, final, run_tiny, strip_seconds

# A residual net for the 1×8×8 digits (fast enough to train in tests): two identity blocks, a
# projection block (stride 2: not removable), one more identity block; plus blocks that are not
# removable for other reasons: a learned scale after the add, and an identity block fed by a
# BatchNorm (no ReLU before it: its tail's ReLU must stay to equal the zeroed branch).
TINY_RESNET = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class Scaled(Block):
        def __init__(self, c):
            super().__init__(c, c)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return super().forward(x) * self.scale

    class TinyResNet(nn.Module):
        input_shape = (1, 8, 8)

        def __init__(self, extra=False):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layers = nn.Sequential(Block(16, 16), Block(16, 16), Block(16, 32, 2), Block(32, 32))
            self.extra = nn.Sequential(nn.BatchNorm2d(32), Block(32, 32), Scaled(32)) if extra else nn.Sequential()
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            out = self.extra(self.layers(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))

    def build():
        return TinyResNet()

    def build_extra():
        return TinyResNet(extra=True)
''')


def tiny_resnet(folder: Path, factory: str = "build") -> str:
    path = folder / "tiny_resnet.py"
    if not path.is_file():
        path.write_text(TINY_RESNET)
    return f"{path}:{factory}"


def _random_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm with non-trivial statistics and affine terms, in eval mode (what a trained net has)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def _zero_branch(model: nn.Module, name: str) -> None:
    """The masked network: the block's branch outputs exactly zero (its last BatchNorm scaled to 0)."""
    bn = model.get_submodule(name).bn2
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)


@pytest.mark.parametrize("names", [("blocks.4",), ("blocks.0", "blocks.1", "blocks.2"),
                                   ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.5", "blocks.7",
                                    "blocks.8")])
def test_a_removed_block_keeps_the_output_shape_and_equals_its_branch_zeroed(names) -> None:
    torch.manual_seed(0)
    dense = _random_statistics(build_model("resnet20"))
    example = example_input(dense.input_shape)
    blocks = find_blocks(dense, example)
    removed = remove_blocks(copy.deepcopy(dense), blocks, names)
    masked = copy.deepcopy(dense)
    for name in names:
        _zero_branch(masked, name)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, expected = removed(x), masked(x)
    assert out.shape == dense(x).shape == (4, 10)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # resnet20's blocks take a ReLU's output: the tail's ReLU is dropped too, nothing is left at all
    assert all(isinstance(removed.get_submodule(name), nn.Identity) for name in names)
    assert not any(key.startswith(tuple(f"{name}." for name in names)) for key in removed.state_dict())


def test_layers_outside_a_removable_block_are_never_removed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = build_model(tiny_resnet(tmp_path, "build_extra"))
    _random_statistics(dense)
    example = example_input((1, 8, 8))
    blocks = find_blocks(dense, example)
    # the projection block (stride 2) and the block with a learned scale after its add are not removable
    assert [b.name for b in blocks] == ["layers.0", "layers.1", "layers.3", "extra.1"]
    assert blocks[-1].input_nonnegative is False and blocks[0].input_nonnegative is True
    everything = remove_blocks(copy.deepcopy(dense), blocks, [b.name for b in blocks])
    layers = lambda m: {n for n, mod in m.named_modules() if isinstance(mod, PRUNABLE)}  # noqa: E731
    assert layers(everything) == layers(dense) - removed_layers(blocks, [b.name for b in blocks])
    assert {"stem.0", "layers.2.conv1", "layers.2.shortcut.0", "extra.2.conv1", "fc"} <= layers(everything)
    # a block fed by a BatchNorm (inputs may be negative) keeps its tail's ReLU: still the zeroed branch
    masked = copy.deepcopy(dense)
    _zero_branch(masked, "extra.1")
    one = remove_blocks(copy.deepcopy(dense), blocks, ["extra.1"])
    assert not isinstance(one.get_submodule("extra.1"), nn.Identity)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(one(x), masked(x), rtol=0, atol=1e-6)
    assert find_blocks(build_model("digits-cnn"), example_input((1, 8, 8))) == []
    with pytest.raises(Exception, match="no removable residual block"):
        ChannelLevels(build_model("digits-cnn"), (1, 8, 8), PruneConfig(structure="blocks", target_macs=0.2), None)


def test_block_norm_removes_the_block_whose_branch_adds_nothing_first() -> None:
    torch.manual_seed(0)
    dense = _random_statistics(build_model("resnet20"))
    _zero_branch(dense, "blocks.5")
    levels = ChannelLevels(dense, dense.input_shape, PruneConfig(structure="blocks", target_macs=0.1), None)
    plan, last = levels.next_plan(dense, levels.dense_plan())
    assert plan.blocks == ("blocks.5",) and last  # one block of resnet20 is ~12% of its MACs
    assert levels.blocks_removed(plan) == {"blocks.5": ["blocks.5.conv1", "blocks.5.conv2"]}


def test_target_speedup_removes_blocks_until_it_is_measured(tmp_path: Path) -> None:
    """Met as measured (a stub device: a network's time grows with its weights, not what the table
    says): the fewest blocks whose removal is measured to reach the speed-up, none more; the predictor
    counts each depth's own nodes; an unreachable speed-up is refused before anything is trained."""
    from tests.test_compressor_latency_plan import StubDevice

    torch.manual_seed(0)
    dense = _random_statistics(build_model("resnet20"))
    example = example_input(dense.input_shape)
    latency = LatencyModel(dense, example, [], 8)
    table = LatencyTable({s.key(): 1e-6 * s.cin * s.cout * int(np.prod(s.spatial)) + 1e-3
                          for s in latency.shapes_needed()}, call_ms=0.05, node_ms=0.002)
    (tmp_path / "t.json").write_text(table.to_json())
    config = PruneConfig(structure="blocks", target_speedup=1.5, latency_table=str(tmp_path / "t.json"),
                         blocks_per_level=2)
    device = StubDevice()
    levels = ChannelLevels(dense, dense.input_shape, config, None, device)
    levels.attach_table(tmp_path, True)
    plan, last, model, counts = levels.dense_plan(), False, dense, []
    while not last:
        before = len(plan.blocks)
        plan, last = levels.next_plan(model, plan)
        model = levels.build(plan, None, "")
        counts.append(len(plan.blocks) - before)
    assert counts[:-1] == [2] * (len(counts) - 1) and counts[-1] in (1, 2) and len(counts) >= 2
    assert levels.measured(plan) >= 1.5 and device.timed >= 2
    fewer = levels._without(levels.dense_plan(), plan.blocks[:-1])  # one block less misses the target
    assert levels.measured(fewer) < 1.5
    figures = levels.describe(model, plan)
    assert figures["measured_speedup"] == levels.measured(plan) and figures["blocks_removed"] == list(plan.blocks)
    # the prediction counts the shallower network's own nodes (each removed block: its two ReLUs and its Add)
    assert levels._depth(plan.blocks).latency.nodes == levels.latency.nodes - 3 * len(plan.blocks)
    with pytest.raises(Exception, match="out of reach.*removable blocks removed"):
        ChannelLevels(dense, dense.input_shape, PruneConfig(structure="blocks", target_speedup=20,
                                                            latency_table=str(tmp_path / "t.json")), None, device)


def test_a_level_without_blocks_loads_and_exports_as_trained(tmp_path: Path) -> None:
    spec = tiny_resnet(tmp_path)
    run = tmp_path / "run"
    # multiples of 8: 8 allowed in the 32-wide groups too (the default keeps them at 16 or more, and more blocks go)
    result = run_tiny(run, model_name=spec, structure="channels,blocks", target_macs=0.85, epochs=1, lr_drops=(),
                      channel_multiple=8)
    levels = result.metrics["methods"]["lr-rewind"]
    assert levels[1]["blocks_removed"] and levels[-1]["macs_removed"] >= 0.6
    assert levels[-1]["blocks_removed"] == levels[1]["blocks_removed"]  # then channel rounds on what is left
    last = final(run, "lr-rewind", levels[-1]["level"])
    assert last["blocks_removed"] == levels[-1]["blocks_removed"] and last["structure"] == "channels,blocks"
    from compressor.run.run_dir import load_level

    loaded = load_level(run, model=spec)
    x = torch.randn(3, 1, 8, 8)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(x)
        assert torch.equal(loaded.model(x), expected)
    from compressor.export.from_run import export_run_dir

    export_run_dir(run, tmp_path / "model", model=spec, layout="external")
    session = ort.InferenceSession(str(tmp_path / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-4)
    convs = sum(1 for node in json.loads((tmp_path / "model" / "manifest.json").read_text())["graph"]
                if node["op_type"] == "Conv")
    assert convs == 1 + 2 * 4 + 1 - 2 * len(levels[-1]["blocks_removed"])  # stem, 4 blocks, 1 projection


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 project; identity add at stride 1, same width."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        hidden = 2 * cin
        self.conv = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                                  nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.identity = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.identity else self.conv(x)


def _tiny_mobilenet() -> nn.Module:
    """A stem, a stride-2 inverted residual (16 → 24, not removable), a removable one (24 → 24), a head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          _InvertedResidual(16, 24, 2), _InvertedResidual(24, 24, 1),
                          nn.Conv2d(24, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model.input_shape = (1, 8, 8)
    return _random_statistics(model)


def test_shrink_to_a_group_whose_root_went_with_a_removed_block() -> None:
    """The 24-wide residual stream's root is the removable block's projection (``4.conv.6``): with that
    block gone, the stream lives on under the first block's projection, which the dense plan does not
    name. Removing the block and cutting the stream in one step keeps the stream's chosen channels and
    equals the network built from the dense weights for that plan."""
    dense = _tiny_mobilenet()
    config = PruneConfig(structure="channels,blocks", target_macs=0.5, channel_multiple=8)
    levels = ChannelLevels(dense, dense.input_shape, config, None)
    assert "4.conv.6" in levels.dense_plan().channels and "3.conv.6" not in levels.dense_plan().channels
    shallow = levels._without(levels.dense_plan(), ["4"])
    assert "3.conv.6" in shallow.channels  # the stream's new root, at full width
    kept = [0, 2, 3, 5, 8, 13, 17, 23, 1, 4, 6, 7, 9, 10, 11, 12]  # 16 of the 24, not the first 16
    plan = type(shallow)({**shallow.channels, "3.conv.6": sorted(kept)}, shallow.blocks)
    shrunk = levels.shrink_to(copy.deepcopy(dense), levels.dense_plan(), plan)
    assert shrunk[3].conv[6].out_channels == 16 and shrunk[5].in_channels == 16
    assert isinstance(shrunk[4], nn.Identity) or not any(isinstance(m, nn.Conv2d) for m in shrunk[4].modules())
    built = levels.build(plan, dense.state_dict(), "dense", state_is_dense=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert shrunk.eval()(x).shape == (2, 10)
        torch.testing.assert_close(shrunk(x), built.eval()(x))
    torch.testing.assert_close(shrunk[3].conv[6].weight, dense[3].conv[6].weight[sorted(kept)])


def test_no_removable_block_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    for structure in ("blocks", "channels,blocks"):
        out = tmp_path / structure
        code, _, stderr = cli(["compress", "--model", "digits-cnn", "--structure", structure, "--epochs", "2",
                               "--out", str(out)])
        assert code == 2 and stderr.count("\n") == 1 and "no removable residual block" in stderr, stderr
        assert not out.exists()


@pytest.mark.slow
def test_sigkilled_block_run_resumes_to_the_same_result() -> None:
    spec = tiny_resnet(TEMP_ROOT)
    args = ["--model", spec, "--structure", "channels,blocks", "--target-macs", "0.85", "--prune-fraction", "0.4", "--method",
            "lr-rewind,finetune", "--epochs", "2", "--lr-drops", "1", "--seed", "3", "--no-progress"]
    out = TEMP_ROOT / "blocks-killed"
    proc = compress_killed_at([*args, "--out", str(out)], "finetune", 1, 0, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "finetune" / "level_1" / "checkpoint.pt").is_file()  # killed inside a block level
    code, _, stderr = cli(["compress", *args, "--out", str(out), "--resume"], timeout=300)
    assert code == 0, stderr
    reference = TEMP_ROOT / "blocks-whole"
    run_tiny(reference, model_name=spec, structure="channels,blocks", target_macs=0.85, prune_fraction=0.4,
             methods=("lr-rewind", "finetune"), epochs=2, lr_drops=(1,))
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (out, reference))
    assert strip_seconds(a) == strip_seconds(b)
    assert a["methods"]["finetune"][1]["blocks_removed"]
    for method, levels in a["methods"].items():
        for entry in levels:
            fa, fb = final(out, method, entry["level"]), final(reference, method, entry["level"])
            assert fa["blocks_removed"] == fb["blocks_removed"]
            assert all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"]), (method, entry["level"])
            assert all(torch.equal(fa["channels"][k], fb["channels"][k]) for k in fa["channels"])
    assert ENV["OMP_NUM_THREADS"] == "1"  # what makes the subprocess and this process compute alike
