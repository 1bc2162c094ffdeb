import math
from dataclasses import MISSING, asdict, fields

import numpy as np
import pytest

from common.cli import main as cli
from common.model.metrics import METRIC_NAMES, classification_metrics, evaluation_counts, metrics_from_counts
from common.protocol import InstructionError, RoundInstruction
from common.settings import RunSettings, SettingsError, parse_assignments

# --- RunSettings.from_run_config -------------------------------------------------------------


def test_empty_run_config_gives_defaults():
    assert RunSettings.from_run_config({}) == RunSettings()


def test_hyphenated_keys_map_to_fields():
    settings = RunSettings.from_run_config(
        {
            "scenario": "heart",
            "num-server-rounds": 7,
            "local-epochs": 3,
            "batch-size": 8,
            "proximal-mu": 0.5,
            "sim-root": "/tmp/sim",
            "data-dir": "/data",
            "min-sites": 3,
            "expected-sites": 4,
            "personalise-epochs": 1,
            "round-timeout": 30.5,
            "strategy": "fedprox",
        }
    )
    assert settings.scenario == "heart"
    assert settings.num_server_rounds == 7
    assert settings.local_epochs == 3
    assert settings.batch_size == 8
    assert settings.proximal_mu == 0.5
    assert settings.sim_root == "/tmp/sim"
    assert settings.data_dir == "/data"
    assert settings.min_sites == 3
    assert settings.expected_sites == 4
    assert settings.personalise_epochs == 1
    assert settings.round_timeout == 30.5
    assert settings.strategy == "fedprox"
    # keys that were not given keep their defaults
    assert settings.lr == RunSettings().lr and settings.seed == RunSettings().seed


def test_every_field_has_a_hyphenated_key():
    for f in fields(RunSettings):
        value = getattr(RunSettings(), f.name)
        settings = RunSettings.from_run_config({f.name.replace("_", "-"): value})
        assert getattr(settings, f.name) == value


@pytest.mark.parametrize(
    ("key", "value", "attr", "expected", "kind"),
    [
        ("lr", "0.1", "lr", 0.1, float),
        ("lr", 1, "lr", 1.0, float),
        ("round-timeout", 30, "round_timeout", 30.0, float),
        ("seed", "7", "seed", 7, int),
        ("num-server-rounds", 5.0, "num_server_rounds", 5, int),
        ("scenario", 5, "scenario", "5", str),
    ],
)
def test_values_are_cast_to_the_field_type(key, value, attr, expected, kind):
    settings = RunSettings.from_run_config({key: value})
    assert getattr(settings, attr) == expected
    assert type(getattr(settings, attr)) is kind


@pytest.mark.parametrize("key", ["epochs", "num_server_rounds", "local_epochs", "LR", "rounds"])
def test_unknown_keys_are_rejected(key):
    with pytest.raises(SettingsError, match="unknown run-config keys"):
        RunSettings.from_run_config({key: 1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", "fast"),
        ("num-server-rounds", "three"),
        ("num-server-rounds", "2.0"),
        ("batch-size", None),
        ("seed", [1]),
        ("local-epochs", 2.5),
        ("num-server-rounds", True),
        ("seed", False),
        ("lr", True),
        ("num-server-rounds", float("inf")),
        ("num-server-rounds", float("nan")),
    ],
)
def test_values_that_do_not_fit_the_type_are_rejected(key, value):
    with pytest.raises(SettingsError, match=key):
        RunSettings.from_run_config({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("strategy", "fedsgd"),
        ("num-server-rounds", 0),
        ("local-epochs", 0),
        ("batch-size", 0),
        ("lr", 0),
        ("lr", -0.1),
        ("lr", "nan"),
        ("min-sites", 0),
        ("local-steps", -1),
        ("optimizer", "rmsprop"),
        ("server-lr", -0.1),
        ("server-tau", "inf"),
    ],
)
def test_impossible_values_are_rejected(key, value):
    with pytest.raises(SettingsError):
        RunSettings.from_run_config({key: value})


def test_local_steps_and_server_optimiser_settings_are_read():
    settings = RunSettings.from_run_config(
        {
            "local-steps": 100,
            "optimizer": "sgd-plain",
            "strategy": "fedyogi",
            "server-lr": 0.01,
            "server-tau": 1e-8,
            "server-beta-2": 0.999,
        }
    )
    assert (settings.local_steps, settings.optimizer) == (100, "sgd-plain")
    assert (settings.server_lr, settings.server_tau, settings.server_beta_2) == (0.01, 1e-8, 0.999)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"strategy": "fedavg", "server-lr": 0.01}, "server-lr only apply to fedadam, fedyogi, fedadagrad"),
        ({"strategy": "fedprox", "server-tau": 1e-8}, "server-tau only apply"),
        ({"strategy": "fedyogi", "server-beta-2": 1.0}, "server-beta-2 must be in"),
        ({"strategy": "fedadagrad", "server-beta-2": 0.9}, "does not apply to fedadagrad"),
        ({"local-steps": -3}, "local-steps must be >= 0"),
    ],
)
def test_server_optimiser_and_local_steps_mistakes_are_explained(config, match):
    with pytest.raises(SettingsError, match=match):
        RunSettings.from_run_config(config)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


# --- RoundInstruction ------------------------------------------------------------------------


def _instruction(**changes) -> RoundInstruction:
    values = dict(
        server_round=2,
        num_rounds=5,
        policy="last:1",
        base_fingerprint="a" * 64,
        frozen_fingerprint="b" * 64,
        local_epochs=3,
        batch_size=16,
        lr=0.05,
        optimizer="adam",
        proximal_mu=0.01,
        seed=42,
        personalise_epochs=1,
        dp=1,
        run_key="42",
        sim_root="/tmp/sites",
    )
    values.update(changes)
    return RoundInstruction(**values)


REQUIRED_KEYS = [f.name.replace("_", "-") for f in fields(RoundInstruction) if f.default is MISSING]


def test_instruction_round_trips_through_config():
    instruction = _instruction()
    config = instruction.to_config()
    assert RoundInstruction.from_config(config) == instruction


def test_instruction_config_uses_hyphenated_keys():
    config = _instruction().to_config()
    assert set(config) == {name.replace("_", "-") for name in asdict(_instruction())}
    assert config["server-round"] == 2
    assert config["base-fingerprint"] == "a" * 64
    assert config["sim-root"] == "/tmp/sites"
    assert not any("_" in key for key in config)


def test_instruction_optional_sim_root_defaults_to_empty():
    config = _instruction().to_config()
    del config["sim-root"]
    assert RoundInstruction.from_config(config).sim_root == ""


def test_instruction_without_local_steps_trains_whole_epochs():
    config = _instruction(local_steps=100).to_config()
    assert RoundInstruction.from_config(config).local_steps == 100
    del config["local-steps"]
    assert RoundInstruction.from_config(config).local_steps == 0


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_instruction_missing_a_key_is_rejected(key):
    config = _instruction().to_config()
    del config[key]
    with pytest.raises(InstructionError, match=key):
        RoundInstruction.from_config(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server-round", "2"),
        ("server-round", 2.0),
        ("num-rounds", None),
        ("policy", 1),
        ("base-fingerprint", b"a" * 64),
        ("lr", "0.05"),
        ("proximal-mu", None),
        ("seed", 42.0),
        ("sim-root", 0),
    ],
)
def test_instruction_wrong_types_are_rejected(key, value):
    config = _instruction().to_config()
    config[key] = value
    with pytest.raises(InstructionError, match=key):
        RoundInstruction.from_config(config)


@pytest.mark.parametrize("key", ["server-round", "num-rounds", "local-epochs", "batch-size", "seed", "lr"])
@pytest.mark.parametrize("value", [True, False])
def test_instruction_bools_are_not_numbers(key, value):
    config = _instruction().to_config()
    config[key] = value
    with pytest.raises(InstructionError, match=key):
        RoundInstruction.from_config(config)


def test_instruction_accepts_int_for_float_and_stores_a_float():
    config = _instruction().to_config()
    config["lr"] = 1
    config["proximal-mu"] = 0
    instruction = RoundInstruction.from_config(config)
    assert instruction.lr == 1.0 and type(instruction.lr) is float
    assert instruction.proximal_mu == 0.0 and type(instruction.proximal_mu) is float


# --- classification_metrics ------------------------------------------------------------------


def test_binary_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.2, 0.8]])
    # predictions 0, 1, 1, 1: TP=2, FP=1, FN=0, TN=1
    metrics = classification_metrics(y_true, proba)
    assert set(metrics) == {*METRIC_NAMES, "loss"}
    assert (metrics["sensitivity"], metrics["specificity"], metrics["test-size"]) == (1.0, 0.5, 4.0)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["balanced-accuracy"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert metrics["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # 0.8
    # positives score 0.55 and 0.8, negatives 0.1 and 0.6: 3 of 4 pairs ordered correctly
    assert metrics["roc-auc"] == pytest.approx(0.75)
    assert metrics["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.55) + math.log(0.8)) / 4)


def test_metrics_from_exact_counts_equal_the_exact_metrics_but_binned_auc():
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 2, 400)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.5 * y_true)))
    proba = np.stack([1 - p1, p1], axis=1)
    exact, counted = classification_metrics(y_true, proba), metrics_from_counts(evaluation_counts(y_true, proba))
    for name in ("balanced-accuracy", "f1", "sensitivity", "specificity", "accuracy", "test-size"):
        assert counted[name] == pytest.approx(exact[name])
    assert counted["roc-auc"] == pytest.approx(exact["roc-auc"], abs=0.02)  # eight logit bins: ties within a bin
    multi = rng.dirichlet([1, 1, 1], 50)
    labels = rng.integers(0, 3, 50)
    for name in ("balanced-accuracy", "f1", "accuracy"):
        assert metrics_from_counts(evaluation_counts(labels, multi))[name] == pytest.approx(
            classification_metrics(labels, multi)[name]
        )


def test_multiclass_metrics_match_hand_computed_values():
    y_true = np.array([0, 1, 2, 2])
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    # predictions 0, 2, 2, 1: per-class F1 = 1, 0, 0.5 -> macro 0.5; recalls 1, 0, 0.5
    metrics = classification_metrics(y_true, proba)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["balanced-accuracy"] == pytest.approx(0.5)
    assert metrics["f1"] == pytest.approx(0.5)
    assert metrics["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.8) + math.log(0.3)) / 4)
    # one-vs-rest AUC: class 0 = 1, class 1 = 2/3, class 2 = 3/4
    assert metrics["roc-auc"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_perfect_predictions_give_perfect_scores():
    y_true = np.array([1, 0, 1, 0])
    proba = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    metrics = classification_metrics(y_true, proba)
    assert metrics["accuracy"] == metrics["balanced-accuracy"] == metrics["f1"] == metrics["roc-auc"] == 1.0


def test_single_class_labels_give_nan_roc_auc_and_finite_rest():
    y_true = np.array([1, 1, 1])
    proba = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    metrics = classification_metrics(y_true, proba)
    assert math.isnan(metrics["roc-auc"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["balanced-accuracy"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # precision 1, recall 2/3
    assert metrics["loss"] == pytest.approx(-(math.log(0.8) + math.log(0.4) + math.log(0.9)) / 3)


def test_assignments_override_settings_with_typed_values() -> None:
    changes = parse_assignments(
        ["local-steps=100", 'optimizer="sgd-plain"', "strategy=fedyogi", "server-lr=0.03", "dp=false"]
    )
    assert changes == {
        "local-steps": 100,
        "optimizer": "sgd-plain",
        "strategy": "fedyogi",
        "server-lr": 0.03,
        "dp": False,
    }
    settings = RunSettings(num_server_rounds=4).with_run_config(changes)
    assert (settings.local_steps, settings.optimizer, settings.strategy, settings.server_lr, settings.dp) == (
        100,
        "sgd-plain",
        "fedyogi",
        0.03,
        False,
    )
    assert settings.num_server_rounds == 4
    with pytest.raises(SettingsError, match="not KEY=VALUE"):
        parse_assignments(["local-steps"])
    with pytest.raises(SettingsError, match="unknown run-config keys \\['local-step'\\]"):
        RunSettings().with_run_config(parse_assignments(["local-step=3"]))
    with pytest.raises(SettingsError, match="run-config key 'local-steps' must be int, got 2.5"):
        RunSettings().with_run_config(parse_assignments(["local-steps=2.5"]))


def test_cli_prints_a_bad_setting_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--rounds", "0"]) == 2
    assert (
        cli.main(["simulate", "--set", "server-lr=0.1"]) == 2
    )  # the default strategy, fedavg, has no server optimiser
    out = capsys.readouterr().out
    assert "SettingsError" in out and "num-server-rounds must be at least 1" in out
    assert "server-lr only apply to fedadam, fedyogi, fedadagrad" in out
