"""The site session cache: one verified manifest object per distinct manifest, however many sites hold a copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.session import site_session
from common.data.scenarios import load_scenario
from common.security.manifest import ManifestError
from simulations.sites import materialize_sites


def test_sites_holding_the_same_manifest_share_one_object(tmp_path: Path) -> None:
    federation = materialize_sites(load_scenario("wdbc"), tmp_path, "shared", allow_non_private=False)
    sessions = [site_session({"partition-id": i}, str(tmp_path)) for i in range(len(federation.sites))]
    assert len({id(s.manifest) for s in sessions}) == 1
    assert sessions[0].manifest == federation.manifest
    assert [s.identity.name for s in sessions] == [c.site_id for c in federation.sites]


def test_a_changed_manifest_is_read_and_verified_again(tmp_path: Path) -> None:
    federation = materialize_sites(load_scenario("wdbc"), tmp_path, "changing", allow_non_private=False)
    before = site_session({"partition-id": 0}, str(tmp_path)).manifest
    path = federation.sites[0].manifest
    path.write_text(path.read_text().replace('"changing"', '"forged"'))
    with pytest.raises(ManifestError):
        site_session({"partition-id": 0}, str(tmp_path))
    assert site_session({"partition-id": 1}, str(tmp_path)).manifest is before
