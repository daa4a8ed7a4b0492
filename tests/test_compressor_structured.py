"""--structure channels: coupled channels shrink together, pruning zeroed channels changes nothing,
a user model goes compress → export → edge_runtime, a SIGKILLed run resumes to the same result, and an
untraceable model is one line and exit 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compressor.prune.channels import Ranking, find_groups, full_plan, group_scores, shrink, widths
from compressor.prune.examples import example_input
from compressor.prune.criteria import criterion_named
from compressor.errors import StructureError
from tests.compressor_fixtures import (ENV, REPO, TEMP_ROOT, assert_same_channel_runs, cli, compress_killed_at,
                                      one_thread, run_tiny)

# A user model with every coupling the issue names: a residual add, a concat, a depthwise conv, a
# grouped conv and a Linear after a flatten of a 4×4 map (so each channel is 16 of its inputs).
USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        input_shape = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.left = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.right = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32))
            self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.BatchNorm2d(32), nn.ReLU())
            self.shortcut = nn.Conv2d(16, 32, 1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x):
            x = self.stem(x)
            y = torch.cat([self.left(x), self.right(x)], dim=1)
            y = torch.relu(self.depthwise(y) + self.shortcut(x))
            y = self.pool(self.grouped(y))
            return self.fc(torch.flatten(y, 1))

    def build():
        return Net()
''')

UNTRACEABLE = textwrap.dedent('''
    import torch
    from torch import nn

    class Cut(nn.Module):
        input_shape = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.conv2(torch.relu(self.conv1(x)).detach())
            return self.fc(x.mean((2, 3)))

    def build():
        return Cut()
''')


# ShuffleNet v2's pattern (torchvision's channel_shuffle): each unit chunks the stream, runs a 1x1 ->
# depthwise -> 1x1 branch on one half, concatenates, and interleaves the halves (view -> transpose -> view).
SHUFFLE_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def shuffle(x):
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)

    def branch(c):
        return nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c),
                             nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = branch(16)

        def forward(self, x):
            x1, x2 = x.chunk(2, dim=1)
            return shuffle(torch.cat([x1, self.branch(x2)], 1))

    class Net(nn.Module):
        input_shape = (3, 16, 16)

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.left = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 1))
            self.right = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1, groups=16))
            self.units = nn.Sequential(Unit(), Unit(), Unit())
            self.last = nn.Conv2d(32, 64, 1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x)
            x = self.units(shuffle(torch.cat([self.left(x), self.right(x)], 1)))
            return self.fc(self.last(x).mean((2, 3)))

    def build():
        return Net()
''')

# GhostNet's pattern (timm's GhostModule): cat([x1, depthwise(x1)])[:, :oup] summed with a shortcut conv;
# the first module's oup (25) is odd, so its slice cuts the concatenation short.
GHOST_MODEL = textwrap.dedent('''
    import math
    import torch
    from torch import nn

    class Ghost(nn.Module):
        def __init__(self, cin, oup):
            super().__init__()
            self.oup, init = oup, math.ceil(oup / 2)
            self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init))
            self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False), nn.BatchNorm2d(init))

        def forward(self, x):
            x1 = self.primary(x)
            return torch.cat([x1, self.cheap(x1)], 1)[:, :self.oup]

    class Block(nn.Module):
        def __init__(self, cin, mid, out):
            super().__init__()
            self.ghost1, self.ghost2 = Ghost(cin, mid), Ghost(mid, out)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                          nn.Conv2d(cin, out, 1, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            return self.ghost2(torch.relu(self.ghost1(x))) + self.shortcut(x)

    class Net(nn.Module):
        input_shape = (3, 16, 16)

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, 2, 1)
            self.block1, self.block2 = Block(16, 48, 25), Block(25, 72, 40)
            self.fc = nn.Linear(40, 10)

        def forward(self, x):
            return self.fc(self.block2(self.block1(self.stem(x))).mean((2, 3)))

    def build():
        return Net()
''')


def user_model(tmp: Path, source: str = USER_MODEL) -> str:
    path = tmp / "user_net.py"
    path.write_text(source)
    return f"{path}:build"


def _load(spec: str) -> nn.Module:
    from compressor.train.models import build_model

    torch.manual_seed(0)
    model = build_model(spec)
    for m in model.modules():  # non-trivial BatchNorm statistics, so a wrong slice would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _random_plan(model: nn.Module, multiple: int = 8):
    """A global ranking of random scores: removes about half of the channels."""
    example = example_input(model.input_shape)
    groups = find_groups(model, example)
    current = full_plan(groups)
    scores = group_scores(model, groups, current, criterion_named(None, "channels"), example)
    generator = torch.Generator().manual_seed(1)
    scores = {root: torch.rand(len(s), generator=generator) for root, s in scores.items()}
    ranking = Ranking(groups, current, scores, multiple)
    return groups, current, ranking.plan(ranking.units // 2), example


def _zero_removed(model: nn.Module, groups, plan, example) -> None:
    """The masked-dense model: every removed channel's producers (conv/linear rows, bias, BatchNorm
    scale and shift) set to zero, so the channel carries exactly zero everywhere."""
    from compressor.prune.channels import trace

    graph = trace(model, example)  # Torch-Pruning's graph, as shrink sees it (channel shuffles passed through)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in groups:
            removed = [c for c in range(g.size) if c not in set(plan[g.root])]
            if not removed:
                continue
            root = modules[g.root]
            group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, removed)
            for item in group:
                module = item.dep.target.module
                if graph.is_out_channel_pruning_fn(item.dep.handler) and hasattr(module, "weight"):
                    index = torch.tensor(item.idxs, dtype=torch.long)
                    module.weight[index] = 0
                    if getattr(module, "bias", None) is not None:
                        module.bias[index] = 0


def test_coupled_channels_shrink_together_and_zeroed_channels_change_nothing(tmp_path: Path) -> None:
    model = _load(user_model(tmp_path))
    groups, current, plan, example = _random_plan(model)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    _zero_removed(model, groups, plan, example)
    with torch.no_grad():
        masked = model(x)
    shrink(model, current, plan, example)
    with torch.no_grad():
        pruned = model(x)
    torch.testing.assert_close(pruned, masked, rtol=0, atol=1e-5)
    # Consistency, layer by layer: concat = left + right, the add ties depthwise and shortcut,
    # depthwise stays depthwise, the grouped conv keeps equal blocks, the flatten feeds the Linear.
    left, right = model.left[0].out_channels, model.right[0].out_channels
    assert model.depthwise[0].in_channels == model.depthwise[0].out_channels == model.depthwise[0].groups == left + right
    assert model.shortcut.out_channels == model.depthwise[0].out_channels == model.grouped[0].in_channels
    assert model.grouped[0].out_channels % 2 == 0 and model.grouped[0].groups == 2
    assert model.fc.in_features == model.grouped[0].out_channels * 16
    assert model.fc.out_features == 10 and model.stem[0].in_channels == 1  # classifier and input untouched
    assert sum(p.numel() for p in model.parameters()) < 20000  # something was removed
    assert all(w % 8 == 0 for name, w in widths(model).items() if name != "fc")


def _masked_equals_pruned(model: nn.Module, multiple: int = 8):
    """Shrinks ``model`` to a random plan; asserts it computes what the masked dense model computes."""
    groups, current, plan, example = _random_plan(model, multiple)
    x = torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(2))
    _zero_removed(model, groups, plan, example)
    with torch.no_grad():
        masked = model(x)
    shrink(model, current, plan, example)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=0, atol=1e-5)
    return {g.root: g for g in groups}


def test_channel_shuffle_keeps_the_shuffled_stream_whole_and_prunes_the_branches(tmp_path: Path) -> None:
    model = _load(user_model(tmp_path, SHUFFLE_MODEL))
    params = sum(p.numel() for p in model.parameters())
    _masked_equals_pruned(model)
    # a shuffle interleaves the concatenated halves: everything feeding or reading it keeps all channels
    assert model.left[2].out_channels == model.right[2].out_channels == 16 and model.last.in_channels == 32
    assert all(u.branch[5].out_channels == 16 for u in model.units)
    # the branch-internal width (1x1 -> depthwise -> 1x1) is free: a multiple of 8, never zero
    inner = [u.branch[0].out_channels for u in model.units]
    assert all(w in (8, 16) and u.branch[3].groups == w == u.branch[5].in_channels for w, u in zip(inner, model.units))
    assert sum(p.numel() for p in model.parameters()) < params


def test_ghost_concatenation_prunes_tied_channel_pairs_and_keeps_a_cut_short_one_whole(tmp_path: Path) -> None:
    model = _load(user_model(tmp_path, GHOST_MODEL))
    groups = _masked_equals_pruned(model)
    # block2's sum ties channel p of the concatenation to channel p + 20 (x1 and its depthwise copy)
    assert groups["block2.shortcut.2"].blocks == 2
    g2 = model.block2.ghost2
    assert model.block2.shortcut[2].out_channels == 2 * g2.primary[0].out_channels == 2 * g2.cheap[0].out_channels
    assert g2.primary[0].out_channels < 20
    # block1's concatenation (26) is cut to 25 by the slice: that stream cannot be pruned pairwise
    assert model.block1.shortcut[2].out_channels == 25 and model.block1.ghost2.primary[0].out_channels == 13


def test_widths_round_to_the_multiple_and_never_vanish_and_exclude_keeps_layers_whole() -> None:
    from compressor.train.models import build_model

    model = build_model("resnet20").eval()
    example = example_input(model.input_shape)
    groups = find_groups(model, example, exclude=("blocks.0.conv1",))
    assert "blocks.0.conv1" not in {g.root for g in groups} and "fc" not in {g.root for g in groups}
    current = full_plan(groups)
    uniform = {g.root: torch.zeros(g.size) for g in groups}
    narrowest = Ranking(groups, current, uniform, 8)
    shrink(model, current, narrowest.plan(narrowest.units), example)
    got = widths(model)
    assert got["blocks.0.conv1"] == 16 and got["fc"] == 10
    assert got["conv"] == 16  # stage 1's channels feed the excluded layer: "whole" means its inputs too
    assert got["blocks.3.shortcut.0"] == 8 and got["blocks.8.conv1"] == 8  # one multiple left, never zero
    assert model.conv.in_channels == 3


def test_rewind_snapshot_is_sliced_to_the_surviving_channels() -> None:
    from compressor.prune.levels import ChannelLevels, Plan
    from compressor.config import PruneConfig
    from compressor.train.models import build_model

    torch.manual_seed(0)
    dense = build_model("digits-cnn")
    levels = ChannelLevels(dense, dense.input_shape, PruneConfig(structure="channels", target_macs=0.5),
                           criterion_named(None, "channels"))
    plan = {root: kept[::2] for root, kept in levels.dense_plan().channels.items()}  # every other channel
    sliced = levels.build(Plan(plan), dense.state_dict(), "test", state_is_dense=True)
    first, second = plan["features.0"], plan["features.3"]
    torch.testing.assert_close(sliced.features[3].weight, dense.features[3].weight[second][:, first])
    torch.testing.assert_close(sliced.features[4].running_mean, dense.features[4].running_mean[second])


def test_min_channels_allows_one_narrower_width_below_the_multiple() -> None:
    from compressor.prune.channels import Group

    groups = [Group("a", 64), Group("b", 12), Group("c", 16)]
    current = {"a": list(range(64)), "b": list(range(12)), "c": list(range(16))}
    scores = {"a": torch.arange(64.0), "b": torch.arange(12.0), "c": torch.arange(16.0)}
    plans = [Ranking(groups, current, scores, 16, 8).plan(n) for n in range(0, 93)]
    # the narrower width only where one multiple is the whole group (channels.floor_width)
    assert {len(p["a"]) for p in plans} == {64, 48, 32, 16} and {len(p["c"]) for p in plans} == {16, 8}
    ranking = Ranking(groups, current, scores, 8)
    plan = ranking.plan(ranking.units)
    assert len(plan["a"]) == 8 and len(plan["b"]) == 8 and plan["a"] == list(range(56, 64))  # the strongest stay


@pytest.mark.parametrize("args, needle", [
    (["--target-macs", "0.5"], "needs --structure channels"),
    (["--structure", "channels", "--target-macs", "1.5"], "target MACs must be in (0, 1)"),
    (["--structure", "channels", "--criterion", "magnitude"], "ranks weights, not channels"),
    (["--structure", "channels", "--channel-multiple", "8", "--min-channels", "9"], "--min-channels must be in"),
    (["--structure", "layers"], "unknown structure"),
    (["--structure", "blocks"], "no removable residual block"),
])
def test_bad_structure_options_are_one_line(tmp_path: Path, args: list, needle: str) -> None:
    code, _, stderr = cli(["compress", "--model", "digits-cnn", "--epochs", "2", "--out", str(tmp_path / "r"), *args])
    assert code == 2 and stderr.count("\n") == 1 and needle in stderr, stderr
    assert not (tmp_path / "r").exists()


def test_user_model_compress_export_and_edge_runtime(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = user_model(tmp_path)
    run, model_dir, dense_dir = tmp_path / "run", tmp_path / "model", tmp_path / "dense"
    # In process, as the CLI builds it (the CLI path of a user model: the untraceable-model test).
    run_tiny(run, model_name=spec, structure="channels", target_macs=0.4, epochs=1, lr_drops=())
    metrics = json.loads((run / "metrics.json").read_text())
    levels = metrics["methods"]["lr-rewind"]
    assert levels[-1]["macs_removed"] >= 0.4 and all(lv["macs_removed"] < 0.4 for lv in levels[:-1])
    assert levels[-1]["params"] < levels[0]["params"] and "widths" in levels[-1]
    assert "MACs removed" in (run / "report.md").read_text()
    from compressor.export.from_run import export_run_dir
    picked = export_run_dir(run, model_dir, model=spec).picked  # the last level; the user names the factory they trust
    assert f"(params {levels[-1]['params']:,} of {levels[0]['params']:,}" in picked and "sparsity" not in picked
    export_run_dir(run, dense_dir, level=0, model=spec)
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(model_dir) < 0.8 * size(dense_dir)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    plain = tmp_path / "plain.onnx"  # the one plain ONNX file a compact MODEL_DIR becomes, for stock onnxruntime
    done = subprocess.run([sys.executable, "-m", "edge_runtime", "to-onnx", str(model_dir), str(plain)],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    session = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    stock = session.run(None, {session.get_inputs()[0].name: x})[0]
    from compressor.run.run_dir import load_level

    with torch.no_grad():
        expected = load_level(run, model=spec).model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(stock, expected, atol=1e-4)
    proc = subprocess.run([sys.executable, "-m", "edge_runtime", "check", str(model_dir)], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert all(layer["storage"] == "dense" for layer in manifest["layers"])  # a smaller dense network
    source = manifest["source"]
    assert source["structure"] == "channels" and source["params"] == levels[-1]["params"]
    assert source["dense_params"] == levels[0]["params"] and source["macs"] < source["dense_macs"]
    info = subprocess.run([sys.executable, "-m", "edge_runtime", "info", str(model_dir)], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=120)
    # what was removed, not a sparsity the layers (all at 0.0%) do not show
    assert f"structured: params {levels[-1]['params']:,} of {levels[0]['params']:,}" in info.stdout, info.stdout
    assert "MACs" in info.stdout and "\nsparsity " not in info.stdout
    from types import SimpleNamespace

    from compressor.export_cli import _report
    result = SimpleNamespace(dense_onnx_bytes=1, sparsity=manifest["sparsity"])  # "larger than its dense ONNX"
    _report(model_dir, result, manifest)
    out, err = capsys.readouterr()
    assert "structured: params" in out and "smaller than dense ONNX" not in out
    assert "CSR" not in err and "warning" not in err  # no layer is CSR: nothing to blame on it


def test_the_structured_summary_names_what_was_removed() -> None:
    from edge_runtime.model_format import structured_summary

    figures = {"structure": "channels", "params": 250, "dense_params": 1000, "macs": 10, "dense_macs": 40}
    assert structured_summary(figures, 0.75) == "params 250 of 1,000 (75.0% removed), MACs 75.0% removed"
    assert structured_summary({"family": "channels:/runs/a"}, 0.54) == "54.0% of params removed"  # older export
    assert structured_summary({"structure": "channels", "params": True, "dense_params": -1}, 0.5) == \
        "50.0% of params removed"  # a manifest's odd values are not figures
    assert structured_summary({"method": "lr-rewind"}, 0.9) == structured_summary("onnx", 0.0) == ""


def test_untraceable_model_is_one_line_naming_the_layer(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _, stderr = cli(["compress", "--model", user_model(tmp_path, UNTRACEABLE), "--structure", "channels",
                           "--epochs", "2", "--out", str(out)])
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "'conv1'" in stderr and "detach" in stderr
    assert not out.exists()  # refused before anything was written


def test_unreachable_target_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="out of reach"):
        run_tiny(tmp_path / "run", model_name="digits-cnn", structure="channels", target_macs=0.99,
                 channel_multiple=32)
    assert not (tmp_path / "run").exists()


STRUCTURED_ARGS = ["--model", "digits-cnn", "--structure", "channels", "--target-macs", "0.6",
                   "--method", "lr-rewind,weight-rewind", "--epochs", "3", "--lr-drops", "2", "--rewind-epoch", "1",
                   "--seed", "3", "--no-progress", "--channel-multiple", "8"]  # 8: enough levels to kill one


@pytest.mark.slow
def test_sigkilled_structured_run_resumes_to_the_same_result() -> None:
    out = TEMP_ROOT / "structured-killed"
    proc = compress_killed_at([*STRUCTURED_ARGS, "--out", str(out)], "weight-rewind", 2, 1, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "weight-rewind" / "level_2" / "checkpoint.pt").is_file()
    code, _, stderr = cli(["compress", *STRUCTURED_ARGS, "--out", str(out), "--resume"], timeout=300)
    assert code == 0, stderr
    reference = TEMP_ROOT / "structured-whole"
    with one_thread():
        run_tiny(reference, model_name="digits-cnn", structure="channels", target_macs=0.6,
                 methods=("lr-rewind", "weight-rewind"), channel_multiple=8)
    assert_same_channel_runs(out, reference)


def test_a_tampered_channel_plan_is_a_checkpoint_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_tiny(run, model_name="digits-cnn", structure="channels", target_macs=0.3, epochs=1, lr_drops=())
    path = run / "lr-rewind" / "level_1" / "final.pt"
    saved = torch.load(path, weights_only=True)
    saved["channels"]["features.0"] = torch.tensor([5, 3, 99])
    torch.save(saved, path)
    from compressor.run.run_dir import load_level

    with pytest.raises(Exception, match="not sorted indices"):
        load_level(run, level=1)


def test_structure_error_is_a_user_error() -> None:
    from compressor.compress_cli import USER_ERRORS

    assert issubclass(StructureError, USER_ERRORS)
