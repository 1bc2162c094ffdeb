"""Who this site is and where its data and keys live: from the node config, or a simulated site folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.data.site_config import site_dir
from common.data.site_config import SITE_CONFIG_FILE, SiteConfig, SiteConfigError


def resolve_site(node_config: Mapping[str, Any], sim_root: str) -> SiteConfig:
    """The site's configuration.

    A deployed SuperNode points at its site file (``--node-config 'site-config="/srv/site/site.toml"'``)
    or gives the same keys inline. A simulated node has only a Flower ``partition-id``;
    its site folder lies under the simulation root the coordinator created on this machine.
    """
    if "site-config" in node_config:
        return SiteConfig.load(Path(str(node_config["site-config"])).expanduser())
    if "data-path" in node_config:
        return SiteConfig.from_mapping(dict(node_config), origin="node config")
    if "partition-id" in node_config:
        if not sim_root:
            raise SiteConfigError(
                "this node is a simulated site (it has a partition-id) but the coordinator sent no sim-root"
            )
        return SiteConfig.load(site_dir(Path(sim_root), int(node_config["partition-id"])) / SITE_CONFIG_FILE)
    raise SiteConfigError(
        "the node config names no site: start flower-supernode with --node-config 'site-config=\"/path/to/site.toml\"'"
    )
