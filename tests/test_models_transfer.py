import pytest
import torch
from torch import nn

from common.model.training import TrainConfig, compute_features, predict_proba, train_plain
from common.model.transfer import PolicyParseError, TransferPolicy, state_fingerprint
from common.model.zoo import ARCHITECTURES, FedModel, UnknownArchitecture, build_model

NUM_CLASSES = 3
INPUT_SHAPES = {"logreg": (6,), "mlp": (6,), "cnn": (2, 8, 8)}

# Names of the parameters that must train under each (architecture, policy).
HEAD = {"head.weight", "head.bias"}
MLP_BLOCK = {i: {f"backbone.{i}.0.weight", f"backbone.{i}.0.bias"} for i in (0, 1)}
CNN_BLOCK = {
    i: {f"backbone.{i}.0.weight", f"backbone.{i}.0.bias", f"backbone.{i}.1.weight", f"backbone.{i}.1.bias"}
    for i in (0, 1)
}
EXPECTED_TRAINABLE = {
    ("logreg", "head"): HEAD,
    ("logreg", "full"): HEAD,
    ("mlp", "head"): HEAD,
    ("mlp", "last:1"): HEAD | MLP_BLOCK[1],
    ("mlp", "last:2"): HEAD | MLP_BLOCK[1] | MLP_BLOCK[0],
    ("mlp", "full"): HEAD | MLP_BLOCK[1] | MLP_BLOCK[0],
    ("cnn", "head"): HEAD,
    ("cnn", "last:1"): HEAD | CNN_BLOCK[1],
    ("cnn", "last:2"): HEAD | CNN_BLOCK[1] | CNN_BLOCK[0],
    ("cnn", "full"): HEAD | CNN_BLOCK[1] | CNN_BLOCK[0],
}
CASES = sorted(EXPECTED_TRAINABLE)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models: extra intra-op threads only add contention on a loaded machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(arch: str, seed: int = 0) -> FedModel:
    torch.manual_seed(seed)
    return build_model(arch, INPUT_SHAPES[arch], NUM_CLASSES)


def _inputs(arch: str, n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *INPUT_SHAPES[arch]), generator=generator)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return x, y


# --- model zoo ---------------------------------------------------------------------------


def test_zoo_is_exactly_the_three_documented_architectures():
    assert set(ARCHITECTURES) == {"logreg", "mlp", "cnn"}


@pytest.mark.parametrize("arch", sorted(INPUT_SHAPES))
def test_every_architecture_gives_one_logit_per_class(arch):
    model = _model(arch)
    x, _ = _inputs(arch, n=5)
    logits = model(x)
    assert logits.shape == (5, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    proba = predict_proba(model, x)
    assert proba.shape == (5, NUM_CLASSES)
    assert proba.sum(axis=1) == pytest.approx([1.0] * 5, abs=1e-5)


def test_architecture_honours_arguments():
    model = build_model("mlp", (6,), 2, {"hidden": [5, 4, 3]})
    assert model.parametrised_blocks() == [0, 1, 2]
    assert model.head.in_features == 3
    cnn = build_model("cnn", (1, 8, 8), 2, {"channels": [4]})
    assert cnn.head.in_features == 4


def test_unknown_architecture_and_bad_arguments_are_rejected():
    with pytest.raises(UnknownArchitecture, match="resnet"):
        build_model("resnet", (6,), 2)
    with pytest.raises(UnknownArchitecture):
        build_model("mlp", (6,), 2, {"depth": 3})
    with pytest.raises(UnknownArchitecture):
        build_model("logreg", (3, 8, 8), 2)  # logreg wants a flat input shape


def test_cnn_uses_group_norm_and_neither_batch_norm_nor_inplace_ops():
    model = _model("cnn")
    modules = list(model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in modules)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert any(isinstance(m, nn.ReLU) for m in modules)
    assert not any(getattr(m, "inplace", False) for m in modules)


@pytest.mark.parametrize("arch", sorted(INPUT_SHAPES))
def test_no_architecture_uses_batch_norm_or_inplace_ops(arch):
    modules = list(_model(arch).modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert not any(getattr(m, "inplace", False) for m in modules)


def test_parametrised_blocks_skip_parameter_free_blocks():
    assert _model("logreg").parametrised_blocks() == []
    assert _model("mlp").parametrised_blocks() == [0, 1]
    cnn = _model("cnn")
    assert len(cnn.backbone) == 3  # two conv blocks and a parameter-free pooling block
    assert cnn.parametrised_blocks() == [0, 1]


# --- split and trainable names --------------------------------------------------------------


@pytest.mark.parametrize(("arch", "transfer"), CASES)
def test_model_equals_trainable_after_frozen_exactly(arch, transfer):
    model = _model(arch)
    frozen, trainable = TransferPolicy.parse(transfer).split(model)
    x, _ = _inputs(arch)
    with torch.no_grad():
        assert torch.equal(model(x), trainable(frozen(x)))
        assert torch.equal(model(x), trainable(compute_features(frozen, x)))


@pytest.mark.parametrize(("arch", "transfer"), CASES)
def test_split_shares_parameters_with_the_model(arch, transfer):
    model = _model(arch)
    frozen, trainable = TransferPolicy.parse(transfer).split(model)
    model_params = {id(p) for p in model.parameters()}
    split_params = [id(p) for p in frozen.parameters()] + [id(p) for p in trainable.parameters()]
    assert sorted(split_params) == sorted(model_params)


@pytest.mark.parametrize(("arch", "transfer"), CASES)
def test_trainable_names_are_head_plus_last_k_blocks(arch, transfer):
    model = _model(arch)
    names = TransferPolicy.parse(transfer).trainable_names(model)
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_TRAINABLE[(arch, transfer)]
    assert set(names) <= set(model.state_dict())


@pytest.mark.parametrize(("arch", "transfer"), CASES)
def test_trainable_and_frozen_state_partition_the_state_dict(arch, transfer):
    model = _model(arch)
    parsed = TransferPolicy.parse(transfer)
    trainable = parsed.trainable_state(model)
    frozen = parsed.frozen_state(model)
    assert set(trainable) == EXPECTED_TRAINABLE[(arch, transfer)]
    assert set(trainable).isdisjoint(frozen)
    assert set(trainable) | set(frozen) == set(model.state_dict())
    # trainable_state is a copy: editing it does not touch the model
    trainable["head.bias"].add_(1.0)
    assert not torch.equal(trainable["head.bias"], model.head.bias)


@pytest.mark.parametrize(("arch", "transfer"), CASES)
def test_apply_sets_requires_grad_exactly_on_trainable_names(arch, transfer):
    model = _model(arch)
    TransferPolicy.parse(transfer).apply(model)
    requires_grad = {name for name, p in model.named_parameters() if p.requires_grad}
    assert requires_grad == EXPECTED_TRAINABLE[(arch, transfer)]


# --- training only moves the trainable part ----------------------------------------------


@pytest.mark.parametrize(("arch", "transfer"), CASES)
def test_training_changes_trainable_and_leaves_frozen_bit_identical(arch, transfer):
    model = _model(arch)
    parsed = TransferPolicy.parse(transfer)
    parsed.apply(model)
    expected = EXPECTED_TRAINABLE[(arch, transfer)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    frozen, trainable = parsed.split(model)
    x, y = _inputs(arch)
    features = compute_features(frozen, x)
    stats = train_plain(trainable, features, y, TrainConfig(epochs=2, batch_size=8, lr=0.1, seed=3))
    assert stats.steps == 6 and stats.examples == len(y)

    for name, param in model.named_parameters():
        if name in expected:
            assert not torch.equal(param.detach(), before[name]), f"{name} did not train"
        else:
            assert torch.equal(param.detach(), before[name]), f"frozen {name} changed"
            assert param.grad is None, f"frozen {name} has a gradient"
    with torch.no_grad():
        assert torch.equal(model(x), trainable(compute_features(frozen, x)))


@pytest.mark.parametrize(("arch", "transfer"), CASES)
def test_frozen_blocks_stay_in_eval_mode_after_apply(arch, transfer):
    model = _model(arch)
    model.train()
    parsed = TransferPolicy.parse(transfer)
    parsed.apply(model)
    frozen, trainable = parsed.split(model)
    # split() builds fresh Sequential wrappers, so look at the model's own blocks inside them
    assert all(not m.training for block in frozen for m in block.modules())
    assert all(m.training for block in trainable for m in block.modules())
    x, y = _inputs(arch, n=8)
    train_plain(trainable, compute_features(frozen, x), y, TrainConfig(epochs=1, batch_size=8))
    assert all(not m.training for block in model.backbone[: len(frozen)] for m in block.modules())


# --- policy strings --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["head", "full", "last:1", "last:2", "last:12"])
def test_policy_string_round_trips(text):
    assert str(TransferPolicy.parse(text)) == text


def test_policy_parse_gives_kind_and_blocks():
    assert TransferPolicy.parse("head") == TransferPolicy("head")
    assert TransferPolicy.parse("full") == TransferPolicy("full")
    assert TransferPolicy.parse("last:3") == TransferPolicy("last", 3)
    assert TransferPolicy.parse("  last:2 ") == TransferPolicy("last", 2)


@pytest.mark.parametrize(
    "text", ["last:0", "last:x", "tail", "", "last", "last:", "last:-1", "last:1.5", "Head", "full:1", "head,full"]
)
def test_policy_parse_rejects_bad_strings(text):
    with pytest.raises(PolicyParseError):
        TransferPolicy.parse(text)


def test_policy_parse_error_is_a_value_error():
    assert issubclass(PolicyParseError, ValueError)


@pytest.mark.parametrize(("arch", "transfer"), [("logreg", "last:1"), ("mlp", "last:3"), ("cnn", "last:3")])
def test_last_k_beyond_the_parametrised_blocks_is_rejected(arch, transfer):
    model = _model(arch)
    parsed = TransferPolicy.parse(transfer)
    with pytest.raises(PolicyParseError, match="trainable blocks"):
        parsed.split(model)
    with pytest.raises(PolicyParseError):
        parsed.trainable_names(model)
    with pytest.raises(PolicyParseError):
        parsed.apply(model)
    assert all(p.requires_grad for p in model.parameters())


# --- state fingerprint -----------------------------------------------------------------------


def test_fingerprint_is_deterministic_and_sha256_hex():
    a = _model("cnn", seed=5).state_dict()
    b = _model("cnn", seed=5).state_dict()
    assert state_fingerprint(a) == state_fingerprint(b)
    assert len(state_fingerprint(a)) == 64
    int(state_fingerprint(a), 16)


def test_fingerprint_differs_between_differently_initialised_models():
    assert state_fingerprint(_model("mlp", seed=1).state_dict()) != state_fingerprint(
        _model("mlp", seed=2).state_dict()
    )


@pytest.mark.parametrize("arch", sorted(INPUT_SHAPES))
def test_fingerprint_changes_when_any_single_tensor_changes(arch):
    state = {k: v.clone() for k, v in _model(arch).state_dict().items()}
    reference = state_fingerprint(state)
    for name in state:
        edited = dict(state)
        tensor = state[name].clone()
        tensor.view(-1)[-1] += 1e-3
        edited[name] = tensor
        assert state_fingerprint(edited) != reference, name
    assert state_fingerprint(state) == reference


def test_fingerprint_covers_names_dtypes_and_shapes():
    base = {"a": torch.arange(6, dtype=torch.float32)}
    reference = state_fingerprint(base)
    assert state_fingerprint({"b": base["a"]}) != reference
    assert state_fingerprint({"a": base["a"].reshape(2, 3)}) != reference
    assert state_fingerprint({"a": base["a"].to(torch.float64)}) != reference
    assert state_fingerprint({"a": base["a"], "extra": torch.zeros(1)}) != reference


def test_fingerprint_is_independent_of_insertion_order():
    state = _model("cnn").state_dict()
    reversed_state = {k: state[k] for k in reversed(list(state))}
    assert list(reversed_state) != list(state)
    assert state_fingerprint(reversed_state) == state_fingerprint(state)


def test_fingerprint_of_non_contiguous_tensor_matches_its_contiguous_copy():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not t.is_contiguous()
    assert state_fingerprint({"t": t}) == state_fingerprint({"t": t.contiguous()})
