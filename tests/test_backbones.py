"""Pretrained torchvision architectures under DP: import, stages, BatchNorm, per-sample gradients, policies, LoRA.

For every listed architecture, on a small input: torchvision imports through the one module
that makes it importable beside the CPU torch build, the model builds and runs, Opacus's
per-sample gradients of every trainable tensor (fixed-statistics BatchNorm included) equal a
microbatch reference (one record per backward pass), and one DP-SGD step moves the trainable
weights while the BatchNorm statistics stay as they were.
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from client.dp_training import dp_train
from common.model.backbones import (
    TORCHVISION_SPECS,
    ChannelMismatch,
    OutOfPlaceBasicBlock,
    UnknownPretrained,
)
from common.model.batchnorm import FixedBatchNorm2d, LayerNotPrivate, batch_statistics, check_per_sample_layers
from common.model.training import TrainConfig, compute_features, use_one_torch_thread
from common.model.transfer import TransferPolicy, base_state, has_adapters
from common.model.zoo import FedModel, UnknownArchitecture, build_model, known_architectures
from common.privacy.noise import SeededRandom

ARCHS = [f"torchvision:{name}" for name in TORCHVISION_SPECS]
REQUIRED = {
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:densenet121",
    "torchvision:efficientnet_b0",
    "torchvision:mobilenet_v3_small",
}
SHAPE = (1, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    use_one_torch_thread()
    yield
    torch.set_num_threads(previous)


def _model(arch: str = "torchvision:resnet18", seed: int = 0, **args) -> FedModel:
    torch.manual_seed(seed)
    model = build_model(arch, SHAPE, 2, {"resize": 0, **args})
    _perturb_statistics(model, seed)
    return model


def _perturb_statistics(model: nn.Module, seed: int) -> None:
    """Pretrained-looking BatchNorm: statistics and affine values away from their initial 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FixedBatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(1 + 0.1 * torch.randn(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))


def _batch(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=generator), torch.tensor([0, 1, 1, 0, 1, 0][:n])


def _per_sample_matches_microbatches(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Check Opacus's per-sample gradients against one backward pass per record; return how many tensors.

    They agree up to float rounding (1e-4 of the gradient's largest entry): summation order differs.
    """
    check_per_sample_layers(module)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(module, loss_reduction="sum", strict=False)
        wrapped.train()
        loss_fn(wrapped(x), y).backward()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable.items()}
    wrapped.disable_hooks()
    for i in range(len(y)):
        module.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss_fn(module(x[i : i + 1]), y[i : i + 1]).backward()
        for name, param in trainable.items():
            error = (per_sample[name][i] - param.grad).abs().max()
            scale = param.grad.abs().max()
            assert error <= 1e-4 * scale + 1e-7, f"{name} record {i}: per-sample gradient off by {error:.3g}"
    wrapped._close()
    return len(trainable)


def _dp_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1) -> None:
    dp_train(
        module,
        x,
        y,
        TrainConfig(epochs=1, batch_size=len(y), lr=0.05),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        sample_rate=1.0,
        steps=steps,
        expected_batch_size=float(len(y)),
        source=SeededRandom(7),
    )


# --- import ----------------------------------------------------------------------------------


def test_torchvision_comes_through_the_one_import_module() -> None:
    from common.model.torchvision_import import torchvision

    module = torchvision()
    assert module.__version__.startswith("0.28.0")
    assert "torchvision._meta_registrations" in sys.modules  # the stand-in that makes it importable here
    assert REQUIRED <= set(known_architectures())


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_builds_runs_and_has_no_batchnorm_or_inplace_left(arch: str) -> None:
    model = _model(arch)
    x, _ = _batch()
    logits = model.eval()(x)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    modules = list(model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert any(isinstance(m, FixedBatchNorm2d) for m in modules)
    assert not any(getattr(m, "inplace", False) for m in modules)
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in modules)
    assert list(model.backbone._modules)[0] == "input"
    assert model.parametrised_blocks()[0] == 1  # the input adapter has no parameters


def test_unknown_pretrained_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownPretrained, match="torchvision:resnet18.*mobilenet_v3_small") as caught:
        build_model("torchvision:resnet19", SHAPE, 2)
    assert isinstance(caught.value, UnknownArchitecture)


def test_a_wrong_number_of_channels_is_refused() -> None:
    with pytest.raises(ChannelMismatch, match="2 channels"):
        build_model("torchvision:resnet18", (2, 32, 32), 2, {"channels": "repeat"})
    with pytest.raises(ChannelMismatch, match="model takes 3"):
        build_model("torchvision:resnet18", (1, 32, 32), 2, {"channels": "native"})


def test_summing_the_first_convolution_equals_repeating_the_grey_channel() -> None:
    same = {"mean": [0.4] * 3, "std": [0.3] * 3}
    repeat = _model(channels="repeat", **same)
    summed = build_model("torchvision:resnet18", SHAPE, 2, {"resize": 0, "channels": "sum", **same})
    state = repeat.state_dict()
    state["backbone.stem.conv1.weight"] = state["backbone.stem.conv1.weight"].sum(dim=1, keepdim=True)
    summed.load_state_dict(state)
    x, _ = _batch()
    torch.testing.assert_close(summed.eval()(x), repeat.eval()(x), rtol=1e-4, atol=1e-5)


def test_resnet_stages_are_torchvision_names() -> None:
    model = _model()
    assert list(model.backbone._modules) == ["input", "stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    assert isinstance(model.backbone.layer4[0], OutOfPlaceBasicBlock)


# --- per-sample gradients and one DP step on every architecture ------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_gradients_equal_microbatches_and_a_dp_step_trains(arch: str) -> None:
    model = _model(arch)
    transfer = TransferPolicy.parse("full")
    transfer.apply(model)
    _, trainable = transfer.split(model)
    x, y = _batch()
    assert _per_sample_matches_microbatches(trainable, x, y) == len(list(model.parameters()))
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" not in k}
    model.zero_grad()
    _dp_step(trainable, x, y)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in statistics.items()), "BatchNorm statistics changed"
    moved = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert len(moved) == len(before), f"{len(before) - len(moved)} trainable tensors did not move"


def test_groupnorm_stage_trains_under_dp_with_exact_per_sample_gradients() -> None:
    model = _model(groupnorm_stages=["layer4"])
    assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.layer4.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in model.backbone.layer3.modules())
    transfer = TransferPolicy.parse("last:1")
    transfer.apply(model)
    frozen, trainable = transfer.split(model)
    x, y = _batch()
    assert _per_sample_matches_microbatches(trainable, compute_features(frozen, x), y) > 0


def test_a_trainable_ordinary_batchnorm_is_refused() -> None:
    layer = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(LayerNotPrivate, match="BatchNorm2d"):
        check_per_sample_layers(layer)
    layer[1].requires_grad_(False)
    check_per_sample_layers(layer)  # frozen: it has no per-sample gradient to compute


def test_batch_statistics_is_ordinary_batchnorm_only_inside_the_block() -> None:
    model = _model()
    x, y = _batch(6)
    mean_before = model.backbone.stem.bn1.running_mean.clone()
    with batch_statistics(model):
        assert isinstance(model.backbone.stem.bn1, nn.BatchNorm2d)
        model.train()
        nn.functional.cross_entropy(model(x), y).backward()
    assert isinstance(model.backbone.stem.bn1, FixedBatchNorm2d)
    assert not torch.equal(model.backbone.stem.bn1.running_mean, mean_before)
    frozen = model.backbone.stem.bn1.running_mean.clone()
    model.train()
    model(x)
    assert torch.equal(model.backbone.stem.bn1.running_mean, frozen), "outside the block statistics are fixed"


# --- transfer policies on a real model ---------------------------------------------------------


def test_policies_name_the_right_tensors_on_resnet18() -> None:
    model = _model()
    names = {str(p): set(TransferPolicy.parse(p).trainable_names(model)) for p in ("head", "last:1", "full", "bias")}
    assert names["head"] == {"head.weight", "head.bias"}
    assert {n.split(".")[1] for n in names["last:1"] - names["head"]} == {"layer4"}
    assert names["full"] == {n for n, _ in model.named_parameters()}
    bias = names["bias"] - names["head"]
    assert bias and all(n.endswith(".bias") for n in bias)
    assert any(".bn" in n for n in bias), "BitFit trains the BatchNorm shifts (a ResNet's convolutions have no bias)"
    assert TransferPolicy.parse("bias").split_index(model) == 1  # the stem's BatchNorm shift trains
    assert TransferPolicy.parse("head").split_index(model) == len(model.backbone)


@pytest.mark.parametrize("policy", ["head", "last:1", "bias", "full", "lora:2"])
def test_model_equals_trainable_after_frozen_on_resnet18(policy: str) -> None:
    model = _model().eval()
    frozen, trainable = TransferPolicy.parse(policy).split(model)
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainable(compute_features(frozen, x)), rtol=0, atol=1e-6)


# --- LoRA under DP ----------------------------------------------------------------------------


def test_dp_lora_moves_the_adapters_and_leaves_the_base_untouched() -> None:
    model = _model()
    plain = copy.deepcopy(model)
    transfer = TransferPolicy.parse("lora:2")
    transfer.apply(model)
    assert has_adapters(model)
    names = transfer.trainable_names(model)
    adapters = [n for n in names if ".lora_" in n]
    assert {n.split(".lora_")[1].split(".")[0] for n in adapters} == {"A", "B"}
    assert any(".layer1." in n for n in adapters) and any(".stem." in n for n in adapters)
    base_before = {k: v.clone() for k, v in base_state(model).items()}
    assert set(base_before) == set(plain.state_dict()), "the base keeps its own names"
    trainable_before = transfer.trainable_state(model)
    frozen, trainable = transfer.split(model)
    x, y = _batch()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.01)  # after a first step: B away from 0, so A gets a real gradient
    assert _per_sample_matches_microbatches(trainable, compute_features(frozen, x), y) == len(names)
    model.zero_grad()
    trainable_before = transfer.trainable_state(model)
    _dp_step(trainable, compute_features(frozen, x), y)
    after = transfer.trainable_state(model)
    for name in names:
        assert not torch.equal(after[name], trainable_before[name]), f"DP-SGD did not move {name}"
    for name, tensor in base_state(model).items():
        if not name.startswith("head."):
            assert torch.equal(tensor, base_before[name]), f"DP-LoRA changed frozen base tensor {name}"
    merged = transfer.merged(model)
    assert not has_adapters(merged) and set(merged.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_lora_adapters_start_the_same_everywhere() -> None:
    first, second = _model(), _model()
    policy = TransferPolicy.parse("lora:2")
    a, b = policy.trainable_state(first), policy.trainable_state(second)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert policy.frozen_state(first).keys() == TransferPolicy.parse("head").frozen_state(_model()).keys()


def test_a_study_file_may_name_a_pretrained_architecture(tmp_path) -> None:
    import numpy as np

    from common.data.scenario import ScenarioError
    from common.data.study import load_study
    from common.model.pretraining import pretrain_source

    rng = np.random.default_rng(0)
    for name, n in (("source", 40), ("site0", 30), ("site1", 30)):
        np.savez(tmp_path / f"{name}.npz", x=rng.random((n, 1, 16, 16)).astype("float32"), y=np.arange(n) % 2)
    text = (
        '[scenario]\nname = "grey-study"\nclass_names = ["a", "b"]\n\n'
        '[model]\narch = "torchvision:resnet18"\nresize = 0\nmean = [0.5, 0.5, 0.5]\nstd = [0.3, 0.3, 0.3]\n'
        'transfer_policy = "lora:2"\n\n[pretrain]\nepochs = 1\n\n[source]\npath = "source.npz"\n\n'
        '[[sites]]\nname = "s0"\npath = "site0.npz"\n\n[[sites]]\nname = "s1"\npath = "site1.npz"\n'
    )
    (tmp_path / "study.toml").write_text(text)
    scenario = load_study(tmp_path / "study.toml", seed=0)
    assert scenario.model.arch == "torchvision:resnet18" and scenario.transfer_policy == "lora:2"
    card = pretrain_source(scenario, tmp_path / "source-model", seed=0)
    assert card.arch_args["resize"] == 0 and "roc-auc" in card.lineage["source_test"]
    (tmp_path / "study.toml").write_text(text.replace("resize = 0", "depth = 3"))
    with pytest.raises(ScenarioError, match="unknown key 'depth'.*channels, resize"):
        load_study(tmp_path / "study.toml", seed=0)
