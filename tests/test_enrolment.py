"""Site keys made at the site (security review finding 4): the coordinator's kit builder takes public keys only.

A site runs ``fedtransfer keys site`` and sends its signed enrolment; ``fedtransfer provision
--enrolment`` writes kits that hold no private key of any site; the site copies its kit into the
folder that holds its keys and ``site check`` passes. Test provisioning (``--sites``) still works,
says loudly what it did, and site check warns about such a kit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.cli import main as cli
from common.data.site_config import SiteConfig
from common.deploy.provision import Endpoint, KitInfo, ProvisionRequest, provision
from common.deploy.site_check import ERROR, WARNING, check_kit
from common.deploy.site_keys import make_site_keys
from common.privacy.policy import load_policy
from common.security.enrolment import Enrolment, EnrolmentError, read_enrolment
from common.security.keys import KeyFileError, read_identity
from common.security.manifest import read_manifest

ADDRESS = [Endpoint.parse("coord.example.org:8000")]


def _write_csv(directory: Path) -> None:
    header = "f0,f1,f2,f3,label\n"
    rows = "".join(f"{i % 5},{i % 3},{i % 7},{i % 2},{i % 2}\n" for i in range(40))
    for split in ("train", "test"):
        (directory / f"{split}.csv").write_text(header + rows)


def test_an_enrolment_is_signed_by_the_site_and_checked(tmp_path: Path) -> None:
    enrolment = make_site_keys("hospital-a", tmp_path / "a", 500, None)
    loaded = read_enrolment(tmp_path / "a" / "hospital-a.enrolment.json")
    assert loaded == enrolment and loaded.declared_size == 500
    assert read_identity(tmp_path / "a" / "keys", "hospital-a").public() == loaded.identity
    assert (tmp_path / "a" / "flower" / "supernode-auth.key").stat().st_mode & 0o777 == 0o600
    document = json.loads(enrolment.to_json())
    for field, value in (("declared-size", 5000), ("supernode-key", document["supernode-key"].replace("A", "B", 1))):
        with pytest.raises(EnrolmentError):
            Enrolment.from_json(json.dumps({**document, field: value}))
    with pytest.raises(EnrolmentError, match="appears twice"):
        Enrolment.from_json(enrolment.to_json().replace('"created":', '"created": "x",\n  "created":', 1))
    with pytest.raises(KeyFileError, match="already exists"):
        make_site_keys("hospital-a", tmp_path / "a", 500, None)


def test_kits_from_enrolments_hold_no_site_private_key_and_pass_the_check(tmp_path: Path) -> None:
    homes = tmp_path / "srv"
    enrolments = [make_site_keys(site, homes / site, 40, None) for site in ("hospital-a", "hospital-b")]
    before = {site: sorted(p.name for p in (homes / site).rglob("*")) for site in ("hospital-a", "hospital-b")}
    result = provision(
        ProvisionRequest("cardio", [], ADDRESS, tmp_path / "kits", install_root=homes, enrolments=enrolments)
    )
    assert not [p for p in (tmp_path / "kits").rglob("*.key") if "sites" in p.parts]
    manifest = read_manifest(result.coordinator_kit / "manifest.json", result.coordinator_fingerprint)
    assert {s: manifest.declared_size(s) for s in manifest.sites} == {"hospital-a": 40, "hospital-b": 40}
    for enrolment in enrolments:
        site = enrolment.site_id
        assert manifest.site(site) == enrolment.identity
        registered = (result.coordinator_kit / "supernode-keys" / f"{site}.pub").read_text().strip()
        assert registered == enrolment.supernode_key
        shutil.copytree(result.site_kits[site], homes / site, dirs_exist_ok=True)  # what the site does
        assert set(before[site]) <= {p.name for p in (homes / site).rglob("*")}
        assert load_policy(SiteConfig.load(homes / site / "site.toml").policy_path).declared_size == 40
        assert KitInfo.load(homes / site).site_keys == "site"
        _write_csv(homes / site / "data")
        findings = check_kit(homes / site)
        assert not [f for f in findings if f.level in (ERROR, WARNING) and f.check not in ("data", "approved apps")]
        assert [f.level for f in findings if f.check == "approved apps"] == [WARNING]  # until it approves the app


def test_test_provisioning_says_so_and_site_check_warns(tmp_path: Path, capsys) -> None:
    out = tmp_path / "kits"
    argv = ["provision", "--federation", "t", "--sites", "a,b", "--superlink-address", "127.0.0.1:9000"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "TEST PROVISIONING" in capsys.readouterr().out
    assert KitInfo.load(out / "sites" / "a").site_keys == "provisioner"
    assert any(
        f.level == WARNING and "made by whoever provisioned" in f.message for f in check_kit(out / "sites" / "a")
    )


def test_the_cli_flow_and_a_manifest_that_revokes_a_site(tmp_path: Path, capsys) -> None:
    homes = tmp_path / "srv"
    for site in ("hospital-a", "hospital-b"):
        assert cli.main(["keys", "site", "--site-id", site, "--out", str(homes / site), "--declared-size", "40"]) == 0
    enrolments = [str(homes / s / f"{s}.enrolment.json") for s in ("hospital-a", "hospital-b")]
    argv = ["provision", "--federation", "cardio", "--superlink-address", "coord.example.org:8000"]
    argv += ["--install-root", str(homes), "--out", str(tmp_path / "kits")]
    assert cli.main(argv + [f"--enrolment={path}" for path in enrolments]) == 0
    printed = capsys.readouterr().out
    assert "TEST PROVISIONING" not in printed and "confirm it with the site by phone" in printed
    coordinator = tmp_path / "kits" / "coordinator"
    first = read_manifest(coordinator / "manifest.json", None)
    revoked_key = first.site("hospital-b").fingerprint()
    assert first.serial == 1
    argv = ["keys", "manifest", "--federation", "cardio", "--coordinator-keys", str(coordinator / "keys")]
    argv += ["--replaces", str(coordinator / "manifest.json"), "--revoke", "hospital-b"]
    assert cli.main([*argv, "--out", str(tmp_path / "next.json")]) == 0
    second = read_manifest(tmp_path / "next.json", first.coordinator.fingerprint())
    assert second.serial == 2 and sorted(second.sites) == ["hospital-a"] and revoked_key in second.revoked
    assert second.declared_sizes == {"hospital-a": 40}
