import math
from dataclasses import MISSING, asdict, fields

import numpy as np
import pytest

from common.cli import main as cli
from common.cli.simulate import settings_from_args as simulate_settings
from common.cli.simulate import simulate_flags
from common.model.metrics import METRIC_NAMES, classification_metrics, evaluation_counts, metrics_from_counts
from common.protocol import InstructionError, RoundInstruction
from common.settings import RunSettings, SettingsError

# --- RunSettings.from_run_config -------------------------------------------------------------


def test_empty_run_config_gives_defaults():
    assert RunSettings.from_run_config({}) == RunSettings()


def test_hyphenated_keys_map_to_fields():
    settings = RunSettings.from_run_config(
        {
            "scenario": "heart",
            "rounds": 7,
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
    assert settings.rounds == 7
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
        ("rounds", 5.0, "rounds", 5, int),
        ("scenario", 5, "scenario", "5", str),
    ],
)
def test_values_are_cast_to_the_field_type(key, value, attr, expected, kind):
    settings = RunSettings.from_run_config({key: value})
    assert getattr(settings, attr) == expected
    assert type(getattr(settings, attr)) is kind


@pytest.mark.parametrize("key", ["epochs", "num-server-rounds", "local_epochs", "LR", "policy"])
def test_unknown_keys_are_rejected(key):
    with pytest.raises(SettingsError, match="unknown run-config keys"):
        RunSettings.from_run_config({key: 1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", "fast"),
        ("rounds", "three"),
        ("rounds", "2.0"),
        ("batch-size", None),
        ("seed", [1]),
        ("local-epochs", 2.5),
        ("rounds", True),
        ("seed", False),
        ("lr", True),
        ("rounds", float("inf")),
        ("rounds", float("nan")),
    ],
)
def test_values_that_do_not_fit_the_type_are_rejected(key, value):
    with pytest.raises(SettingsError, match=key):
        RunSettings.from_run_config({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("strategy", "fedsgd"),
        ("rounds", 0),
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
        rounds=5,
        transfer_policy="last:1",
        base_fingerprint="a" * 64,
        base_card_sha256="c" * 64,
        frozen_fingerprint="b" * 64,
        local_epochs=3,
        batch_size=16,
        lr=0.05,
        optimizer="adam",
        proximal_mu=0.01,
        seed=42,
        personalise_epochs=1,
        dp=1,
        run_id="42",
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
    assert not any("_" in key for key in config)


def test_the_instruction_carries_no_site_location():
    """Security review finding 6: the site's root came from the instruction, before its signature was checked."""
    assert "sim-root" not in _instruction().to_config()
    assert not any("root" in f.name or "path" in f.name for f in fields(RoundInstruction))


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
        ("rounds", None),
        ("transfer-policy", 1),
        ("base-fingerprint", b"a" * 64),
        ("lr", "0.05"),
        ("proximal-mu", None),
        ("seed", 42.0),
    ],
)
def test_instruction_wrong_types_are_rejected(key, value):
    config = _instruction().to_config()
    config[key] = value
    with pytest.raises(InstructionError, match=key):
        RoundInstruction.from_config(config)


@pytest.mark.parametrize("key", ["server-round", "rounds", "local-epochs", "batch-size", "seed", "lr"])
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


def test_simulate_flags_are_the_run_settings() -> None:
    parser = cli.build_parser()
    simulate = parser._subparsers._group_actions[0].choices["simulate"]
    flags = {o.lstrip("-") for a in simulate._actions for o in a.option_strings if o.startswith("--")}
    settings = {f.name.replace("_", "-") for f in fields(RunSettings)}
    offered = set(simulate_flags())
    assert offered == settings - {"coordinator-keys", "manifest"}
    assert flags - {"help", "verbose"} == offered | {f"no-{k}" for k in offered if isinstance(_default(k), bool)}


def _default(key: str) -> object:
    return getattr(RunSettings(), key.replace("-", "_"))


def test_simulate_flags_parse_to_typed_settings() -> None:
    args = cli.build_parser().parse_args(
        ["simulate", "--local-steps", "100", "--optimizer", "sgd-plain", "--strategy", "fedyogi"]
        + ["--server-lr", "0.03", "--no-dp", "--transfer-policy", "last:1", "-v"]
    )
    settings, open_settings = simulate_settings(args)
    assert "batch_size" in open_settings and not {"local_steps", "dp", "transfer_policy"} & open_settings
    assert (settings.local_steps, settings.optimizer, settings.strategy, settings.server_lr, settings.dp) == (
        100,
        "sgd-plain",
        "fedyogi",
        0.03,
        False,
    )
    assert settings.transfer_policy == "last:1" and args.verbose
    assert settings.with_(local_steps=0, optimizer="sgd", strategy="fedavg", server_lr=0.0, dp=True) == RunSettings(
        transfer_policy="last:1"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--strategy", "fedsgd"], "invalid choice: 'fedsgd'"),
        (["simulate", "--local-steps", "2.5"], "invalid int value: '2.5'"),
        (["simulate", "--set", "lr=1"], "unrecognized arguments: --set lr=1"),
        (["simulate", "--rounds"], "expected one argument"),
    ],
)
def test_cli_usage_errors_are_one_line_with_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("fedtransfer")


def test_cli_prints_a_bad_setting_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--rounds", "0"]) == 2
    assert cli.main(["simulate", "--server-lr", "0.1"]) == 2  # the default strategy, fedavg, has no server optimiser
    out = capsys.readouterr().err
    assert "SettingsError" in out and "rounds must be at least 1" in out
    assert "server-lr only apply to fedadam, fedyogi, fedadagrad" in out


def test_a_scenario_recipe_sets_only_what_the_user_left_open() -> None:
    from dataclasses import replace as with_fields

    from common.data.scenarios import load_scenario
    from simulations.simulate import with_recipe

    scenario = with_fields(load_scenario("wdbc"), recipe={"batch_size": 64, "lr": 0.2})
    settings, open_settings = simulate_settings(cli.build_parser().parse_args(["simulate", "--lr", "0.1"]))
    applied = with_recipe(settings, scenario, open_settings)
    assert (applied.batch_size, applied.lr) == (64, 0.1)
    assert with_recipe(settings, scenario, frozenset()) == settings
