"""Who this site is and where its data lives: from the node config, or a simulated site folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.simulated_sites import site_dir
from common.site_config import SITE_CONFIG_FILE, SiteConfig, SiteConfigError


def resolve_site(node_config: Mapping[str, Any], sim_root: str) -> SiteConfig:
    """The site's configuration.

    A deployed SuperNode names its data in its node config (``site-id``, ``data-path``,
    ``state-dir``, optional ``label-column``). A simulated node only has a Flower
    ``partition-id``; its site folder lies under the simulation root the coordinator
    created on this same machine.
    """
    if "data-path" in node_config:
        return SiteConfig.from_mapping(dict(node_config), origin="node config")
    if "partition-id" in node_config:
        if not sim_root:
            raise SiteConfigError(
                "this node is a simulated site (it has a partition-id) but the coordinator sent no sim-root"
            )
        return SiteConfig.load(site_dir(Path(sim_root), int(node_config["partition-id"])) / SITE_CONFIG_FILE)
    raise SiteConfigError(
        "the node config names no data: start flower-supernode with "
        "--node-config 'site-id=\"...\" data-path=\"...\" state-dir=\"...\"'"
    )
