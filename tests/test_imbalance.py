"""Imbalanced outcomes: class-weighted losses from public priors, metrics that show a collapse, bootstrap intervals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.fine_tune import class_prior, train_config
from common.model.checkpoint import ModelCard
from common.model.metrics import bootstrap_intervals, classification_metrics, headline_metric
from common.model.pretrain_settings import PretrainConfig, PretrainError
from common.model.training import TrainConfig, example_losses, label_prior, train_plain
from common.privacy.policy import PolicyError, SitePolicy, load_policy, write_policy
from common.protocol import RoundInstruction
from simulations.sites import declared_class_prior

PRIOR = (0.9, 0.1)


def _card(prior: list[float] | None) -> ModelCard:
    return ModelCard(
        arch="logreg",
        arch_args={},
        input_shape=[2],
        class_names=["no", "yes"],
        weights_sha256="0" * 64,
        model_fingerprint="0" * 64,
        source_description="s",
        class_prior=prior,
    )


def test_balanced_weights_make_each_class_weigh_the_same() -> None:
    logits = torch.zeros((10, 2))
    labels = torch.tensor([0] * 9 + [1])
    plain = example_losses(logits, labels, TrainConfig())
    weighted = example_losses(logits, labels, TrainConfig(class_weights="balanced", class_prior=PRIOR))
    assert torch.allclose(plain, torch.full((10,), math.log(2)))
    # 9 majority rows at 0.1/0.9 and one minority row at 0.1/0.1: equal total weight per class
    assert weighted[:9].sum() == pytest.approx(weighted[9].item())
    # no row weighs more than plain cross-entropy, so DP-SGD's clipping cannot cut a rare class's weight back
    assert weighted[9].item() == pytest.approx(plain[9].item()) and bool((weighted <= plain + 1e-7).all())


def test_logit_adjustment_shifts_the_decision_towards_the_minority() -> None:
    logits = torch.zeros((2, 2))
    labels = torch.tensor([0, 1])
    adjusted = example_losses(logits, labels, TrainConfig(class_weights="logit-adjust", class_prior=PRIOR))
    # the adjusted logits favour the majority, so the loss of a minority row is larger: training pushes it up
    assert adjusted[1] > adjusted[0]


def test_a_weighted_loss_needs_a_valid_prior() -> None:
    with pytest.raises(ValueError, match="prior"):
        TrainConfig(class_weights="balanced")
    with pytest.raises(ValueError, match="class_weights"):
        TrainConfig(class_weights="focal", class_prior=PRIOR)


def test_balanced_training_stops_predicting_only_the_majority() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.08).astype(np.int64)
    x = rng.normal(size=(400, 2)) + y[:, None] * 1.2
    features, labels = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    results = {}
    for weights in ("none", "balanced"):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        prior = label_prior(y, 2) if weights != "none" else ()
        train_plain(model, features, labels, TrainConfig(epochs=30, lr=0.1, class_weights=weights, class_prior=prior))
        with torch.no_grad():
            proba = torch.softmax(model(features), dim=1).numpy()
        results[weights] = classification_metrics(y, proba)
    assert results["none"]["sensitivity"] < 0.3 and results["none"]["accuracy"] > 0.9  # accuracy hides the collapse
    assert results["balanced"]["sensitivity"] > 0.6
    assert results["balanced"]["balanced-accuracy"] > results["none"]["balanced-accuracy"] + 0.1


def test_the_site_prior_is_public_its_declaration_else_the_source_mix() -> None:
    policy = SitePolicy(max_epsilon=5, delta=1e-5, declared_size=100, declared_class_prior=(0.7, 0.3))
    assert class_prior(policy, _card([0.9, 0.1])) == (0.7, 0.3)
    undeclared = SitePolicy(max_epsilon=5, delta=1e-5, declared_size=100)
    assert class_prior(undeclared, _card([0.9, 0.1])) == (0.9, 0.1)
    assert class_prior(undeclared, _card(None)) == ()


def test_a_site_without_a_prior_trains_unweighted_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    instruction = RoundInstruction(
        server_round=1,
        rounds=2,
        transfer_policy="head",
        base_fingerprint="a" * 64,
        base_card_sha256="c" * 64,
        frozen_fingerprint="b" * 64,
        local_epochs=1,
        batch_size=8,
        lr=0.1,
        optimizer="sgd",
        proximal_mu=0.0,
        seed=0,
        personalise_epochs=0,
        dp=1,
        run_id="r",
        class_weights="balanced",
    )
    assert train_config(instruction, PRIOR).class_weights == "balanced"
    assert train_config(instruction, ()).class_weights == "none"
    assert "training unweighted" in caplog.text


def test_declared_class_prior_is_validated_and_round_trips(tmp_path: Path) -> None:
    policy = SitePolicy(max_epsilon=5, delta=1e-5, declared_size=100, declared_class_prior=(0.85, 0.15))
    write_policy(policy, tmp_path / "policy.toml")
    assert load_policy(tmp_path / "policy.toml") == policy
    for bad in ((1.0,), (0.5, 0.6), (0.0, 1.0), ("a", "b")):
        with pytest.raises(PolicyError, match="declared_class_prior"):
            SitePolicy(max_epsilon=5, delta=1e-5, declared_class_prior=bad)


def test_a_simulated_site_declares_its_class_mix_rounded_to_5_percent_and_never_0_or_1(tmp_path: Path) -> None:
    assert declared_class_prior(np.array([0] * 86 + [1] * 14), 2) == (0.85, 0.15)
    assert declared_class_prior(np.array([1] * 40), 2) == pytest.approx((0.05, 0.95))
    three = declared_class_prior(np.array([0, 1, 2, 2, 2, 2, 2, 2, 2, 2]), 3)
    assert three == pytest.approx((0.1, 0.1, 0.8)) and math.isclose(sum(three), 1.0)
    policy = SitePolicy(
        max_epsilon=5, delta=1e-5, declared_size=40, declared_class_prior=declared_class_prior(np.array([1] * 40), 2)
    )
    write_policy(policy, tmp_path / "policy.toml")
    assert load_policy(tmp_path / "policy.toml").declared_class_prior == pytest.approx((0.05, 0.95))


def test_bootstrap_intervals_hold_the_point_estimate_and_shrink_with_more_rows() -> None:
    rng = np.random.default_rng(1)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.2, n), 0.01, 0.99)
        return y, np.stack([1 - p, p], axis=1)

    small, large = sample(30), sample(600)
    widths = []
    for y, proba in (small, large):
        point = classification_metrics(y, proba)
        intervals = bootstrap_intervals(y, proba, seed=0)
        for metric in ("roc-auc", "balanced-accuracy", "f1", "accuracy"):
            low, high = intervals[metric]
            assert low <= point[metric] <= high
        widths.append(intervals["roc-auc"][1] - intervals["roc-auc"][0])
    assert widths[1] < widths[0] / 2


def test_headline_metric_follows_the_number_of_classes() -> None:
    assert headline_metric(2) == "roc-auc" and headline_metric(3) == "balanced-accuracy"
    assert headline_metric(2, "f1") == "f1"


def test_pretrain_options_are_validated() -> None:
    with pytest.raises(PretrainError, match="epochs"):
        PretrainConfig(epochs=0)
    with pytest.raises(PretrainError, match="validation_fraction"):
        PretrainConfig(validation_fraction=0.9)
    with pytest.raises(PretrainError, match="class_weights"):
        PretrainConfig(class_weights="focal")
