"""``fedtransfer import-model``: torchvision-format weights in, checkpoints with honest cards out; bad files refused.

The weights files are written by the tests themselves (nothing is downloaded): a fedtransfer
model saved under torchvision's state-dict names with ``torch.save``, as torchvision's own
``.pth`` files are, or as safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.cli.main import main
from common.model.checkpoint import load_checkpoint
from common.model.importing import ImportRequest, WeightsMismatch, import_model, torchvision_state_dict
from common.model.torchvision_import import torchvision
from common.model.training import compute_features
from common.model.transfer import TransferPolicy
from common.model.zoo import build_model

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(5)
    return build_model("torchvision:resnet18", SHAPE, 2, {"resize": 0, "mean": [0.5] * 3, "std": [0.25] * 3})


@pytest.fixture
def weights(tmp_path: Path, source_model) -> Path:
    path = tmp_path / "resnet18-source.pth"
    torch.save(torchvision_state_dict(source_model, "torchvision:resnet18"), path)
    return path


def _request(weights: Path, **changes) -> ImportRequest:
    fields = dict(
        arch="torchvision:resnet18",
        weights=weights,
        input_shape=SHAPE,
        class_names=("normal", "pneumonia"),
        resize=0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        licence="CC BY 4.0",
        pretraining_data="a test's source model",
    )
    return ImportRequest(**{**fields, **changes})


def test_the_exported_file_is_a_torchvision_state_dict(weights: Path) -> None:
    state = torch.load(weights, weights_only=True)
    reference = torchvision().models.resnet18(num_classes=2)
    reference.load_state_dict(state, strict=True)  # torchvision's own model takes it as it is


def test_import_keeps_every_backbone_tensor_and_records_the_card(tmp_path: Path, weights: Path, source_model) -> None:
    card = import_model(_request(weights), tmp_path / "imported")
    model, loaded_card = load_checkpoint(tmp_path / "imported")
    assert loaded_card == card
    imported, original = model.state_dict(), source_model.state_dict()
    backbone = [k for k in original if not k.startswith("head.")]
    assert backbone and all(torch.equal(imported[k], original[k]) for k in backbone)
    assert card.arch == "torchvision:resnet18" and card.default_transfer_policy == "head"
    assert card.lineage["weights_file_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card.lineage["kind"] == "imported" and card.lineage["weights_file"] == weights.name
    assert card.licence == "CC BY 4.0" and card.pretraining_data == "a test's source model"
    assert "grey channel repeated to 3" in card.preprocessing and "mean [0.5, 0.5, 0.5]" in card.preprocessing
    assert card.arch_args["channels"] == "repeat" and card.arch_args["resize"] == 0
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().backbone(x), source_model.eval().backbone(x)
        )  # the same input adaptation and features


def test_safetensors_and_a_wrapped_checkpoint_import_the_same(tmp_path: Path, weights: Path) -> None:
    state = torch.load(weights, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    cards = [
        import_model(_request(path), tmp_path / path.stem)
        for path in (weights, tmp_path / "w.safetensors", tmp_path / "wrapped.pth")
    ]
    assert len({c.model_fingerprint for c in cards}) == 1


def test_resize_and_sum_are_recorded_and_applied(tmp_path: Path, weights: Path) -> None:
    card = import_model(_request(weights, resize=56, channels="sum", mean=(0.5,), std=(0.25,)), tmp_path / "s")
    model, _ = load_checkpoint(tmp_path / "s")
    assert model.backbone.stem.conv1.weight.shape[1] == 1
    assert "resized to 56x56" in card.preprocessing and "summed" in card.preprocessing
    assert model.eval()(torch.rand(2, *SHAPE)).shape == (2, 2)


def test_groupnorm_stages_are_fresh_recorded_and_warned(tmp_path: Path, weights: Path, caplog) -> None:
    card = import_model(_request(weights, groupnorm_stages=("layer4",)), tmp_path / "g")
    model, _ = load_checkpoint(tmp_path / "g")
    norm = model.backbone.layer4[0].bn1
    assert isinstance(norm, torch.nn.GroupNorm)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))  # fresh, as ModuleValidator.fix makes it
    assert "GroupNorm" in card.preprocessing and card.arch_args["groupnorm_stages"] == ["layer4"]
    assert "GroupNorm" in caplog.text


# --- bad input: one line, exit status 2 --------------------------------------------------------


def _cli(args: list[str], capsys) -> tuple[int, str]:
    status = main(["import-model", *args])
    return status, capsys.readouterr().err


def _base_args(weights: Path, out: Path) -> list[str]:
    return ["--weights", str(weights), "--out", str(out), "--input-shape", "1,28,28", "--classes", "normal,pneumonia"]


def _one_line(text: str) -> str:
    """The message as one line: the console wraps long lines at its width; the error itself is one line."""
    return " ".join(text.split())


def test_unknown_architecture_lists_the_known_ones(tmp_path: Path, weights: Path, capsys) -> None:
    status, err = _cli(["--arch", "torchvision:resnet19", *_base_args(weights, tmp_path / "o")], capsys)
    assert status == 2
    assert "torchvision:resnet18" in _one_line(err) and "mobilenet_v3_small" in _one_line(err)
    assert not (tmp_path / "o").exists()


def test_weights_for_another_architecture_name_the_mismatching_keys(tmp_path: Path, weights: Path, capsys) -> None:
    status, err = _cli(["--arch", "torchvision:resnet50", *_base_args(weights, tmp_path / "o")], capsys)
    assert status == 2 and "layer1.0.conv3.weight" in _one_line(err)
    state = torch.load(weights, weights_only=True)
    state["layer4.1.conv2.weight"] = torch.zeros(512, 256, 3, 3)
    torch.save(state, tmp_path / "bad-shape.pth")
    wanted = r"layer4\.1\.conv2\.weight \(512, 256, 3, 3\) \(needs \(512, 512, 3, 3\)\)"
    with pytest.raises(WeightsMismatch, match=wanted):
        import_model(_request(tmp_path / "bad-shape.pth"), tmp_path / "o")


class _Payload:
    """A pickled object whose loading would create a marker file: proof that nothing was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_file_that_weights_only_refuses_is_never_unpickled(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": _Payload(marker)}))
    torch.save({"conv1.weight": _Payload(marker)}, tmp_path / "evil-zip.pth")
    for path in (evil, tmp_path / "evil-zip.pth"):
        status, err = _cli(["--arch", "torchvision:resnet18", *_base_args(path, tmp_path / "o")], capsys)
        assert status == 2 and "weights_only" in _one_line(err) and "not unpickled" in _one_line(err)
    assert not marker.exists()


def test_a_wrong_number_of_channels_and_a_missing_file_are_one_line(tmp_path: Path, weights: Path, capsys) -> None:
    args = ["--arch", "torchvision:resnet18", "--weights", str(weights), "--out", str(tmp_path / "o")]
    status, err = _cli([*args, "--input-shape", "2,28,28", "--classes", "a,b", "--resize", "0"], capsys)
    assert status == 2 and "2 channels" in _one_line(err)
    missing = tmp_path / "nowhere" / "resnet18.pth"
    status, err = _cli(["--arch", "torchvision:resnet18", *_base_args(missing, tmp_path / "o")], capsys)
    assert status == 2 and "put the" in _one_line(err)
    assert f"noweightsfileat{missing}" in "".join(err.split())  # rich may fold a long path


def test_the_cli_writes_a_checkpoint_that_loads(tmp_path: Path, weights: Path, capsys) -> None:
    args = [*_base_args(weights, tmp_path / "c"), "--resize", "0", "--licence", "CC BY 4.0"]
    assert main(["import-model", "--arch", "torchvision:resnet18", *args]) == 0
    model, card = load_checkpoint(tmp_path / "c")
    assert card.licence == "CC BY 4.0" and card.arch_args["mean"] == [0.485, 0.456, 0.406]
    assert "Wrote" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="the optional extra fedtransfer[timm] is absent")
@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_a_timm_model_imports_and_its_head_trains_under_dp(tmp_path: Path, name: str) -> None:
    from common.model.torchvision_import import timm
    from tests.test_backbones import _per_sample_matches_microbatches

    torch.manual_seed(0)
    torch.save(timm().create_model(name, pretrained=False).state_dict(), tmp_path / f"{name}.pth")
    card = import_model(
        _request(tmp_path / f"{name}.pth", arch=f"timm:{name}", resize=32, mean=(), std=()), tmp_path / "t"
    )
    model, _ = load_checkpoint(tmp_path / "t")
    assert card.arch == f"timm:{name}" and list(model.backbone._modules) == ["input", "features"]
    for policy in ("head", "lora:2"):
        transfer = TransferPolicy.parse(policy)
        transfer.apply(model)
        frozen, trainable = transfer.split(model)
        x = torch.rand(3, *SHAPE)
        assert _per_sample_matches_microbatches(trainable, compute_features(frozen, x), torch.tensor([0, 1, 1])) > 0
