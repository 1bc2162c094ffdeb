"""A site learns where it lives from its own node only (security review finding 6).

The instruction used to carry ``sim-root``, read before its signature was checked: a relay pointed a
site at a federation it had written itself. Now a deployed node names its ``site-config`` and a
simulated node its partition, under a root its machine was bound to; a message cannot change either.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.session import site_config
from common.cli import main as cli
from common.data.site_config import SiteConfigError
from common.security.keys import COORDINATOR_NAME, read_identity
from common.security.manifest import read_manifest


def test_a_simulated_node_without_a_local_root_refuses(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="names no simulation root"):
        site_config({"partition-id": 0, "num-partitions": 2}, "")


def test_simulated_sites_are_written_by_the_simulator_and_found_from_the_node(tmp_path: Path, capsys) -> None:
    root = tmp_path / "sim"
    assert cli.main(["simulated-sites", "--scenario", "wdbc", "--root", str(root)]) == 0
    printed = capsys.readouterr().out
    assert f"FEDTRANSFER_SIM_ROOT={root}" in printed and "coordinator-keys=" in printed
    coordinator = read_identity(root / "coordinator-keys", COORDINATOR_NAME)
    manifest = read_manifest(root / "coordinator-keys" / "manifest.json", coordinator.public().fingerprint())
    config = site_config({"partition-id": 1, "num-partitions": 4}, str(root))
    assert config.site_id in manifest.sites and config.coordinator_fingerprint == coordinator.public().fingerprint()
    assert manifest.declared_size(config.site_id) is not None
    assert config.keys_dir == (root / config.site_id / "keys").resolve()
    deployed = site_config({"site-config": str(root / "hospital-c" / "site.toml")}, str(tmp_path / "elsewhere"))
    assert deployed.keys_dir == (root / "hospital-c" / "keys").resolve()
