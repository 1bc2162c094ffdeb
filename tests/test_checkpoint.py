import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from common.model.checkpoint import (
    CARD_FILE,
    CARD_FORMAT,
    WEIGHTS_FILE,
    ArchitectureMismatch,
    CardInvalid,
    CheckpointError,
    CheckpointNotFound,
    CorruptWeights,
    ModelCard,
    WeightsHashMismatch,
    load_card,
    load_checkpoint,
    save_checkpoint,
)
from common.model.transfer import state_fingerprint
from common.model.zoo import FedModel, build_model
from common.security.tensors import tensors_to_bytes

LINEAGE = {"parent": "0" * 64, "rounds": 4, "sites": ["cleveland", "hungary"], "policy": "last:1"}


def _mlp(hidden=(4, 3), seed: int = 0) -> FedModel:
    torch.manual_seed(seed)
    return build_model("mlp", [5], 2, {"hidden": list(hidden)})


def _card_fields(hidden=(4, 3)) -> dict:
    return {
        "arch": "mlp",
        "arch_args": {"hidden": list(hidden)},
        "input_shape": [5],
        "class_names": ["benign", "malignant"],
        "source_description": "unit-test model",
        "preprocessing": "z-score",
        "feature_names": ["a", "b", "c", "d", "e"],
        "default_transfer_policy": "last:1",
        "lineage": LINEAGE,
    }


@pytest.fixture
def saved(tmp_path):
    model = _mlp()
    directory = tmp_path / "ckpt"
    card = save_checkpoint(model, directory, **_card_fields())
    return model, card, directory


def _read_card(directory: Path) -> dict:
    return json.loads((directory / CARD_FILE).read_text())


def _write_card(directory: Path, raw) -> None:
    (directory / CARD_FILE).write_text(json.dumps(raw))


def _replace_weights(directory: Path, data: bytes) -> None:
    """Replace the weights file and update the card's hash so only the content is wrong."""
    (directory / WEIGHTS_FILE).write_bytes(data)
    raw = _read_card(directory)
    raw["weights_sha256"] = hashlib.sha256(data).hexdigest()
    _write_card(directory, raw)


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_restores_identical_state_dict(saved):
    model, _, directory = saved
    loaded, _ = load_checkpoint(directory)
    original = model.state_dict()
    restored = loaded.state_dict()
    assert list(restored) == list(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor), name
    x = torch.randn(7, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_round_trip_preserves_card_fields_and_lineage(saved):
    model, card, directory = saved
    _, loaded = load_checkpoint(directory)
    assert loaded == card
    for key, value in _card_fields().items():
        assert getattr(loaded, key) == value, key
    assert loaded.lineage == LINEAGE
    assert loaded.format == CARD_FORMAT
    assert loaded.num_classes == 2
    assert loaded.created  # save stamps a creation time
    assert loaded.model_fingerprint == state_fingerprint(model.state_dict())
    assert loaded.weights_sha256 == hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()


def test_save_writes_exactly_the_two_files(saved):
    _, _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted([CARD_FILE, WEIGHTS_FILE])


def test_save_creates_nested_directories(tmp_path):
    directory = tmp_path / "a" / "b" / "c"
    save_checkpoint(_mlp(), directory, **_card_fields())
    model, _ = load_checkpoint(directory)
    assert isinstance(model, FedModel)


def test_saving_again_overwrites_with_the_new_model(saved):
    _, first, directory = saved
    other = _mlp(seed=9)
    second = save_checkpoint(other, directory, **_card_fields())
    assert second.model_fingerprint != first.model_fingerprint
    loaded, card = load_checkpoint(directory)
    assert card == second
    assert state_fingerprint(loaded.state_dict()) == state_fingerprint(other.state_dict())


def test_card_json_round_trip():
    card = ModelCard(
        arch="cnn",
        arch_args={"channels": [4]},
        input_shape=[1, 8, 8],
        class_names=["a", "b", "c"],
        weights_sha256="ab" * 32,
        model_fingerprint="cd" * 32,
        source_description="x",
        lineage={"k": [1, 2]},
    )
    assert ModelCard.from_json(card.to_json()) == card


# --- not found -------------------------------------------------------------------------------


def test_missing_directory_is_checkpoint_not_found(tmp_path):
    with pytest.raises(CheckpointNotFound):
        load_checkpoint(tmp_path / "does-not-exist")


def test_missing_card_is_checkpoint_not_found(saved):
    _, _, directory = saved
    (directory / CARD_FILE).unlink()
    with pytest.raises(CheckpointNotFound, match=CARD_FILE):
        load_checkpoint(directory)


def test_missing_weights_is_checkpoint_not_found(saved):
    _, _, directory = saved
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointNotFound, match=WEIGHTS_FILE):
        load_checkpoint(directory)


# --- invalid card ----------------------------------------------------------------------------


def test_card_that_is_not_json_is_invalid(saved):
    _, _, directory = saved
    (directory / CARD_FILE).write_text("{ this is not json")
    with pytest.raises(CardInvalid, match="not valid JSON"):
        load_checkpoint(directory)


def test_card_that_is_not_a_json_object_is_invalid(saved):
    _, _, directory = saved
    _write_card(directory, [_read_card(directory)])
    with pytest.raises(CardInvalid, match="JSON object"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "missing",
    ["arch", "arch_args", "input_shape", "class_names", "weights_sha256", "model_fingerprint", "source_description"],
)
def test_card_missing_a_required_field_is_invalid(saved, missing):
    _, _, directory = saved
    raw = _read_card(directory)
    del raw[missing]
    _write_card(directory, raw)
    with pytest.raises(CardInvalid, match="missing"):
        load_checkpoint(directory)


def test_card_with_unknown_field_is_invalid(saved):
    _, _, directory = saved
    raw = _read_card(directory)
    raw["trust_me"] = True
    _write_card(directory, raw)
    with pytest.raises(CardInvalid, match=r"unknown fields \['trust_me'\]"):
        load_checkpoint(directory)


@pytest.mark.parametrize("fmt", [CARD_FORMAT + 1, 0, "1", None])
def test_card_with_wrong_format_version_is_invalid(saved, fmt):
    _, _, directory = saved
    raw = _read_card(directory)
    raw["format"] = fmt
    _write_card(directory, raw)
    with pytest.raises(CardInvalid, match="format"):
        load_checkpoint(directory)


def test_card_without_format_is_invalid(saved):
    _, _, directory = saved
    raw = _read_card(directory)
    del raw["format"]
    _write_card(directory, raw)
    with pytest.raises(CardInvalid, match="format"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("input_shape", [0]),
        ("input_shape", "5"),
        ("input_shape", [5.0]),
        ("class_names", ["only"]),
        ("class_names", "ab"),
    ],
)
def test_card_with_bad_shape_or_classes_is_invalid(saved, key, value):
    _, _, directory = saved
    raw = _read_card(directory)
    raw[key] = value
    _write_card(directory, raw)
    with pytest.raises(CardInvalid):
        load_card(directory)


# --- weights do not match the card -----------------------------------------------------------


def test_weights_edited_by_one_byte_fail_the_hash(saved):
    _, _, directory = saved
    path = directory / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsHashMismatch, match="sha256"):
        load_checkpoint(directory)


def test_changed_tensor_values_with_updated_hash_fail_the_fingerprint(saved):
    model, _, directory = saved
    with torch.no_grad():
        model.head.bias.add_(1.0)
    _replace_weights(directory, tensors_to_bytes(model.state_dict()))
    with pytest.raises(WeightsHashMismatch, match="fingerprint"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: _mlp(hidden=(4, 2)), id="same-names-other-shapes"),
        pytest.param(lambda: _mlp(hidden=(4, 3, 2)), id="extra-block"),
        pytest.param(lambda: build_model("logreg", [5], 2), id="other-architecture"),
        pytest.param(lambda: build_model("mlp", [5], 3, {"hidden": [4, 3]}), id="other-class-count"),
    ],
)
def test_weights_of_another_model_with_matching_hash_are_architecture_mismatch(saved, other):
    _, _, directory = saved
    _replace_weights(directory, tensors_to_bytes(other().state_dict()))
    with pytest.raises(ArchitectureMismatch):
        load_checkpoint(directory)


def test_weights_with_other_dtype_are_architecture_mismatch(saved):
    model, _, directory = saved
    _replace_weights(directory, tensors_to_bytes(model.to(torch.float64).state_dict()))
    with pytest.raises(ArchitectureMismatch, match="float64"):
        load_checkpoint(directory)


def test_unknown_architecture_in_card_is_architecture_mismatch(saved):
    _, _, directory = saved
    raw = _read_card(directory)
    raw["arch"] = "resnet152"
    _write_card(directory, raw)
    with pytest.raises(ArchitectureMismatch, match="resnet152"):
        load_checkpoint(directory)


def test_unusable_architecture_arguments_are_architecture_mismatch(saved):
    _, _, directory = saved
    raw = _read_card(directory)
    raw["arch_args"] = {"depth": 50}
    _write_card(directory, raw)
    with pytest.raises(ArchitectureMismatch):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:4], id="shorter-than-header-length"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: bytes(range(256)) * 4, id="garbage"),
        pytest.param(lambda data: (20).to_bytes(8, "little") + b'{"a": not json!!!}', id="bad-header"),
    ],
)
def test_unreadable_weights_with_matching_hash_are_corrupt(saved, corrupt):
    _, _, directory = saved
    _replace_weights(directory, corrupt((directory / WEIGHTS_FILE).read_bytes()))
    with pytest.raises(CorruptWeights):
        load_checkpoint(directory)


# --- never unpickle --------------------------------------------------------------------------


def _create_marker(path: str) -> None:
    Path(path).write_text("unpickled")


class _Payload:
    """Unpickling this object runs ``_create_marker`` — the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_create_marker, (self.marker,))


def test_the_pickle_payload_is_live(tmp_path):
    # Guards the next test: unpickling this payload really does create its marker.
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_renamed_to_safetensors_is_never_unpickled(saved, tmp_path, writer):
    _, _, directory = saved
    marker = tmp_path / "unpickled-marker"
    payload = {"head.weight": _Payload(marker)}
    if writer == "pickle":
        data = pickle.dumps(payload)
    else:
        buffer_path = tmp_path / "payload.pt"
        torch.save(payload, buffer_path)
        data = buffer_path.read_bytes()
    assert not marker.exists()
    _replace_weights(directory, data)
    with pytest.raises(CheckpointError):
        load_checkpoint(directory)
    assert not marker.exists()


def test_checkpoint_errors_share_one_base_class():
    for error in (CheckpointNotFound, CardInvalid, WeightsHashMismatch, CorruptWeights, ArchitectureMismatch):
        assert issubclass(error, CheckpointError)
