"""Simulated sites on one machine: each scenario site gets a folder like a real site's.

``<root>/site-<partition>/`` holds ``site.toml``, its data under ``data/`` and its state
(privacy policy, ledger) under ``state/``. A simulated ClientApp finds its folder from its
Flower partition id, then behaves exactly like a deployed site reading its node config.
"""

from __future__ import annotations

from pathlib import Path

from common.scenarios import Scenario
from common.site_config import SITE_CONFIG_FILE, SiteConfig
from common.site_data import write_site_data


def site_dir(root: Path, partition_id: int) -> Path:
    return Path(root) / f"site-{partition_id}"


def materialize_sites(scenario: Scenario, root: Path) -> list[SiteConfig]:
    """Write every target site's data and ``site.toml`` under ``root``; existing state is kept."""
    configs = []
    for index, site in enumerate(scenario.sites):
        folder = site_dir(root, index).resolve()
        config = SiteConfig(site_id=site.name, data_path=folder / "data", state_dir=folder / "state")
        write_site_data(site, config.data_path, scenario.feature_names)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        (folder / SITE_CONFIG_FILE).write_text(config.to_toml())
        configs.append(config)
    return configs
