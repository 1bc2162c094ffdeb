"""common.privacy.rdp against Opacus itself: the same RDP of a subsampled Gaussian step, bit for bit."""

from __future__ import annotations

import math
import random
import warnings

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.privacy import rdp

ORDERS = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


def _opacus(q: float, sigma: float, order: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=order))


@pytest.mark.parametrize(("q", "sigma"), [(0.0613, 1.4686), (0.381, 2.9077), (0.25, 0.5), (0.001, 40.0), (0.9, 1.1)])
def test_rdp_at_every_default_order_is_opacuss_bit_for_bit(q: float, sigma: float) -> None:
    for order in ORDERS:
        assert rdp.subsampled_gaussian_rdp(q, sigma, order) == _opacus(q, sigma, order), order


def test_rdp_at_random_settings_is_opacuss_bit_for_bit() -> None:
    rng = random.Random(5)
    for _ in range(150):
        q, sigma = rng.uniform(1e-4, 0.999), math.exp(rng.uniform(math.log(0.3), math.log(60)))
        order = rng.choice([rng.choice(ORDERS), round(rng.uniform(1.01, 80), 2), float(rng.randint(2, 256))])
        assert rdp.subsampled_gaussian_rdp(q, sigma, order) == _opacus(q, sigma, order), (q, sigma, order)


def test_the_edge_cases_are_opacuss() -> None:
    for q, sigma, order in ((0.0, 1.0, 8.0), (1.0, 2.0, 8.0), (1.0, 2.0, 3.5), (0.3, 0.0, 8.0), (0.3, 1.0, math.inf)):
        assert rdp.subsampled_gaussian_rdp(q, sigma, order) == _opacus(q, sigma, order)


def test_a_series_longer_than_one_chunk_is_summed_to_its_end(monkeypatch) -> None:
    monkeypatch.setattr(rdp, "SERIES_CHUNK", 2)
    for order in (1.5, 4.5, 10.9):
        assert rdp.subsampled_gaussian_rdp(0.2, 1.3, order) == _opacus(0.2, 1.3, order)


def test_the_comparison_can_fail() -> None:
    assert rdp.subsampled_gaussian_rdp(0.2, 1.3 * (1 + 1e-12), 4.5) != _opacus(0.2, 1.3, 4.5)
    assert rdp.subsampled_gaussian_rdp(0.2, 1.3 * (1 + 1e-12), 8.0) != _opacus(0.2, 1.3, 8.0)
