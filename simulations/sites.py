"""Simulated sites on one machine: each scenario site gets a folder like a real site's.

``<root>/<site name>/`` holds ``site.toml``, its data under ``data/``, its keys and the
federation manifest under ``keys/``, and its state (privacy policy, ledger) under ``state/``;
``<root>/simulated-sites.json`` lists the sites in Flower's partition order, and
``<root>/coordinator-keys/`` holds the simulated coordinator's keys and the signed manifest.
This is the simulator's work, done before the run starts: the coordinator (``server/``) reads
them like a deployed coordinator's keys, and a simulated ClientApp learns where its folder is
only from its own node's configuration (``site-config``, or the simulation root the simulator
bound it to, with its partition id), never from a message. The coordinator's keys and the
manifest are new for every run; the sites' keys and state are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.scenario import Scenario
from common.data.scenarios import load_scenario
from common.data.site_config import SIMULATED_SITES_FILE, SITE_CONFIG_FILE, SiteConfig, simulated_site_dir, site_dir
from common.data.site_data import SiteData, write_site_data
from common.io import write_atomic
from common.privacy.policy import PolicyError, SitePolicy, load_policy, write_policy
from common.security.keys import (
    COORDINATOR_NAME,
    Identity,
    KeyFileError,
    read_identity,
    write_identity,
)
from common.security.manifest import (
    MANIFEST_FILE,
    Manifest,
    read_manifest,
    sign_manifest,
    write_manifest,
)
from common.settings import RunSettings

COORDINATOR_KEYS_DIR = "coordinator-keys"


@dataclass(frozen=True)
class SimulatedFederation:
    """The simulated sites' configurations and the coordinator's throwaway identity."""

    sites: list[SiteConfig]
    coordinator: Identity
    manifest: Manifest


def declared_size(records: int) -> int:
    """The size a simulated site declares publicly: its training records rounded to the nearest 10."""
    return max(10, int(round(records, -1)))


#: A simulated site declares its class mix in steps of this share.
CLASS_SHARE_STEP = 0.05


def declared_class_prior(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """The class mix a simulated site declares publicly: its training shares rounded to the nearest 5%.

    Each share is kept between 5% and 95% (a declaration of 0 or 1 would be refused by the policy), then
    the shares are scaled to sum to 1. It is a public statement the site makes, like its declared size.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    shares = counts / max(1, counts.sum())
    rounded = np.clip(np.round(shares / CLASS_SHARE_STEP) * CLASS_SHARE_STEP, CLASS_SHARE_STEP, 1 - CLASS_SHARE_STEP)
    return tuple(round(float(v), 4) for v in rounded / rounded.sum())


def simulated_policy(site: SiteData, scenario: Scenario, allow_non_private: bool) -> SitePolicy:
    """The privacy policy a simulated site starts with: a cumulative cap of 10 at delta 1e-5, its declared
    size and class mix, DP federated evaluation, and reproducible noise allowed only on built-in generated or
    bundled data."""
    return SitePolicy(
        max_epsilon=10.0,
        delta=1e-5,
        declared_size=declared_size(len(site.train)),
        declared_class_prior=declared_class_prior(site.train.y, len(scenario.class_names)),
        evaluation="dp",
        allow_non_private=allow_non_private,
        allow_reproducible_noise=scenario.public_data,
    )


def _site_identity(keys_dir: Path, name: str) -> Identity:
    """A simulated site keeps its keys across runs, like a real one (its ledger head is signed with them)."""
    try:
        return read_identity(keys_dir, name)
    except KeyFileError:
        shutil.rmtree(keys_dir, ignore_errors=True)
        identity = Identity.generate(name)
        write_identity(identity, keys_dir)
        return identity


def prepare_sites(settings: RunSettings) -> RunSettings:
    """Write the simulated sites of ``settings.scenario`` under ``settings.sim_root`` (default ``OUT/sites``).

    Returns the settings with ``sim_root`` resolved and ``coordinator-keys`` and ``manifest`` pointing at the
    simulated coordinator's keys. A resumed run (``settings.resume``) keeps the keys and manifest it started with.
    """
    root = Path(settings.sim_root or settings.output_dir() / "sites").expanduser().resolve()
    scenario = load_scenario(
        settings.scenario,
        seed=settings.seed,
        data_dir=Path(settings.data_dir) if settings.data_dir else None,
        private=not settings.per_site_scaling,
    )
    materialize_sites(scenario, root, "simulation", allow_non_private=not settings.dp, reuse_keys=settings.resume)
    return settings.with_(
        sim_root=str(root),
        coordinator_keys=str(root / COORDINATOR_KEYS_DIR),
        manifest=str(root / COORDINATOR_KEYS_DIR / MANIFEST_FILE),
    )


def site_configs(root: Path, sites: int) -> list[Path]:
    """The ``site.toml`` of each simulated site under ``root``, in partition order."""
    return [simulated_site_dir(Path(root), index) / SITE_CONFIG_FILE for index in range(sites)]


def materialize_sites(
    scenario: Scenario, root: Path, federation: str, allow_non_private: bool, reuse_keys: bool = False
) -> SimulatedFederation:
    """Write every target site's data, keys, the signed manifest and ``site.toml`` under ``root``.

    A site's privacy policy is written only if the site has none yet: like a real site's,
    it belongs to the site and outlives runs, as do its keys and ledger. The coordinator gets
    a new identity and manifest for every run; ``reuse_keys`` keeps those of the previous run
    (a resumed run continues under the same manifest).
    """
    root = Path(root).resolve()
    coordinator_dir = root / COORDINATOR_KEYS_DIR
    if reuse_keys and coordinator_dir.is_dir():
        coordinator = read_identity(coordinator_dir, COORDINATOR_NAME)
        manifest = read_manifest(coordinator_dir / MANIFEST_FILE, coordinator.public().fingerprint())
        return SimulatedFederation(
            [SiteConfig.load(site_dir(root, site.name) / SITE_CONFIG_FILE) for site in scenario.sites],
            coordinator,
            manifest,
        )
    for index, site in enumerate(scenario.sites):
        _adopt_numbered_folder(root, index, site.name)
    coordinator = Identity.generate(COORDINATOR_NAME)
    identities = [_site_identity(site_dir(root, site.name) / "keys", site.name) for site in scenario.sites]
    configs = []
    for site in scenario.sites:
        folder = site_dir(root, site.name)
        keys_dir = folder / "keys"
        config = SiteConfig(
            site_id=site.name,
            data_path=folder / "data",
            state_dir=folder / "state",
            keys_dir=keys_dir,
            manifest=keys_dir / MANIFEST_FILE,
            coordinator_fingerprint=coordinator.public().fingerprint(),
        )
        write_site_data(site, config.data_path, scenario.feature_names)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        if not config.policy_path.exists():
            write_policy(simulated_policy(site, scenario, allow_non_private), config.policy_path)
        (folder / SITE_CONFIG_FILE).write_text(config.to_toml())
        configs.append(config)
    manifest = sign_manifest(
        federation, coordinator, [i.public() for i in identities], declared_sizes=_declared_sizes(configs)
    )
    shutil.rmtree(coordinator_dir, ignore_errors=True)
    write_identity(coordinator, coordinator_dir)
    write_manifest(manifest, coordinator_dir / MANIFEST_FILE)
    for config in configs:
        write_manifest(manifest, config.manifest)
    write_atomic(root / SIMULATED_SITES_FILE, json.dumps([site.name for site in scenario.sites]).encode("utf-8"))
    return SimulatedFederation(configs, coordinator, manifest)


def _adopt_numbered_folder(root: Path, index: int, name: str) -> None:
    """A simulation root from before folders bore the sites' names keeps site ``name`` in ``site-<index>``: move
    it, keys, policy and ledger with it, so that its spend carries over."""
    old, new = root / f"site-{index}", site_dir(root, name)
    if old == new or new.exists() or not (old / SITE_CONFIG_FILE).is_file():
        return
    if SiteConfig.load(old / SITE_CONFIG_FILE).site_id == name:
        old.rename(new)


def _declared_sizes(configs: list[SiteConfig]) -> dict[str, int]:
    """What each simulated site declares in its policy: the size it enrols with."""
    sizes = {}
    for config in configs:
        try:
            declared = load_policy(config.policy_path).declared_size
        except PolicyError:
            continue  # the site reports its broken policy when asked to train
        if declared is not None:
            sizes[config.site_id] = declared
    return sizes
