"""Simulated sites on one machine: each scenario site gets a folder like a real site's.

``<root>/site-<partition>/`` holds ``site.toml``, its data under ``data/``, throwaway keys
and the federation manifest under ``keys/``, and its state (privacy policy, ledger) under
``state/``. A simulated ClientApp finds its folder from its Flower partition id, then
behaves exactly like a deployed site. Keys are new for every run; state is kept.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from common.security.keys import COORDINATOR_NAME, Identity, read_identity, write_identity
from common.security.manifest import MANIFEST_FILE, Manifest, read_manifest, sign_manifest, write_manifest
from common.data.scenarios import Scenario
from common.data.site_config import SITE_CONFIG_FILE, SiteConfig, site_dir
from common.data.site_data import write_site_data
from common.privacy.policy import SitePolicy, write_policy

COORDINATOR_KEYS_DIR = "coordinator-keys"


@dataclass(frozen=True)
class SimulatedFederation:
    """The simulated sites' configurations and the coordinator's throwaway identity."""

    sites: list[SiteConfig]
    coordinator: Identity
    manifest: Manifest



def simulated_policy(allow_non_private: bool) -> SitePolicy:
    """The privacy policy a simulated site starts with: a cumulative cap of 10 at delta 1e-5."""
    return SitePolicy(max_epsilon=10.0, delta=1e-5, allow_non_private=allow_non_private)


def materialize_sites(scenario: Scenario, root: Path, federation: str, policy: SitePolicy, reuse_keys: bool = False) -> SimulatedFederation:
    """Write every target site's data, fresh keys, the signed manifest and ``site.toml`` under ``root``.

    A site's privacy policy is written only if the site has none yet: like a real site's,
    it belongs to the site and outlives runs, as does its ledger. ``reuse_keys`` keeps the
    keys and manifest of the previous run (a resumed run continues under the same manifest).
    """
    coordinator_dir = Path(root).resolve() / COORDINATOR_KEYS_DIR
    if reuse_keys and coordinator_dir.is_dir():
        coordinator = read_identity(coordinator_dir, COORDINATOR_NAME)
        manifest = read_manifest(coordinator_dir / MANIFEST_FILE, coordinator.public().fingerprint())
        return SimulatedFederation([SiteConfig.load(site_dir(root, i) / SITE_CONFIG_FILE) for i in range(len(scenario.sites))], coordinator, manifest)
    coordinator = Identity.generate(COORDINATOR_NAME)
    identities = [Identity.generate(site.name) for site in scenario.sites]
    manifest = sign_manifest(federation, coordinator, [i.public() for i in identities])
    shutil.rmtree(coordinator_dir, ignore_errors=True)
    write_identity(coordinator, coordinator_dir)
    write_manifest(manifest, coordinator_dir / MANIFEST_FILE)
    configs = []
    for index, (site, identity) in enumerate(zip(scenario.sites, identities)):
        folder = site_dir(root, index).resolve()
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
            write_policy(policy, config.policy_path)
        shutil.rmtree(keys_dir, ignore_errors=True)
        write_identity(identity, keys_dir)
        write_manifest(manifest, config.manifest)
        (folder / SITE_CONFIG_FILE).write_text(config.to_toml())
        configs.append(config)
    return SimulatedFederation(configs, coordinator, manifest)
