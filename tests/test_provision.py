"""Provisioning kits and checking them: layout, permissions, certificates, separation of private material."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import stat
import tomllib
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.cli import deploy as cli_deploy
from common.data.site_config import SiteConfig
from common.deploy.provision import Endpoint, KitInfo, ProvisionError, ProvisionRequest, provision
from common.deploy.site_check import ERROR, check_kit, has_errors
from common.privacy.policy import load_policy, write_policy
from common.security.manifest import read_manifest

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _provision(out: Path, federation: str = "demo", sites: list[str] = SITES, **kw) -> object:
    return provision(
        ProvisionRequest(
            federation, sites, [Endpoint.parse("coord.example.org:8000"), Endpoint.parse("10.0.0.5:8000")], out, **kw
        )
    )


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory):
    return _provision(tmp_path_factory.mktemp("kits") / "out")


def _private_files(kit: Path) -> set[str]:
    return {str(p.relative_to(kit)) for p in kit.rglob("*.key")}


def test_layout_and_private_material_is_separated(kits) -> None:
    coordinator = kits.coordinator_kit
    assert _private_files(coordinator) == {"keys/coordinator.enc.key", "keys/coordinator.sign.key", "tls/superlink.key"}
    assert sorted(p.name for p in (coordinator / "supernode-keys").iterdir()) == [f"{s}.pub" for s in SITES]
    for site, kit in kits.site_kits.items():
        assert _private_files(kit) == {f"keys/{site}.enc.key", f"keys/{site}.sign.key", "flower/supernode-auth.key"}
        for name in (
            "site.toml",
            "manifest.json",
            "tls/ca.pem",
            "state/privacy-policy.toml",
            "start-supernode.sh",
            "kit.json",
        ):
            assert (kit / name).is_file(), name
        assert not (kit / "tls" / "superlink.key").exists()
    assert (kits.ca_dir / "ca.key").is_file() and kits.ca_dir.parent == coordinator.parent
    for path in Path(kits.coordinator_kit).parent.rglob("*.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_superlink_certificate_names_every_address_and_loopback(kits) -> None:
    tls = kits.coordinator_kit / "tls"
    cert = x509.load_pem_x509_certificate((tls / "superlink.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_supernode_keys_are_ec_openssh_and_pairs_match(kits) -> None:
    for site, kit in kits.site_kits.items():
        private = load_ssh_private_key((kit / "flower" / "supernode-auth.key").read_bytes(), password=None)
        public = load_ssh_public_key((kits.coordinator_kit / "supernode-keys" / f"{site}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()


def test_site_config_scripts_and_flower_connection(kits) -> None:
    kit = kits.site_kits["hospital-b"]
    config = SiteConfig.load(kit / "site.toml")
    assert config.site_id == "hospital-b" and config.data_path == kit.resolve() / "data"
    assert config.coordinator_fingerprint == kits.coordinator_fingerprint
    manifest = read_manifest(config.manifest, config.coordinator_fingerprint)
    assert sorted(manifest.sites) == SITES
    script = (kit / "start-supernode.sh").read_text()
    assert f'site-config="{kit.resolve() / "site.toml"}"' in script
    assert "--root-certificates" in script and "--port 9095" in script and "coord.example.org:8000" in script
    assert os.access(kit / "start-supernode.sh", os.X_OK)
    connection = tomllib.loads((kits.coordinator_kit / "flower-home" / "config.toml").read_text())
    assert connection["superlink"]["default"] == "demo"
    assert connection["superlink"]["demo"]["root-certificates"] == str(
        kits.coordinator_kit.resolve() / "tls" / "ca.pem"
    )
    assert connection["superlink"]["demo"]["address"] == "127.0.0.1:8001"  # the Control API, on loopback only
    superlink = (kits.coordinator_kit / "start-superlink.sh").read_text()
    assert (
        "--enable-supernode-auth" in superlink
        and "--host 127.0.0.1 --port 8001" in superlink
        and "--database" in superlink
        and "0.0.0.0" not in superlink
    )
    gateway = (kits.coordinator_kit / "start-gateway.sh").read_text()
    assert (
        "fedtransfer gateway" in gateway
        and "--listen 0.0.0.0:8000" in gateway
        and "--superlink 127.0.0.1:8001" in gateway
    )
    assert "expected-sites=3" in (kits.coordinator_kit / "run.sh").read_text()


def _write_csv(directory: Path, columns: int, rows: int = 40) -> None:
    header = ",".join([f"f{i}" for i in range(columns)] + ["label"])
    for split in ("train", "test"):
        lines = [",".join(str((i * (c + 3)) % 7) for c in range(columns)) + f",{i % 2}" for i in range(rows)]
        (directory / f"{split}.csv").write_text(header + "\n" + "\n".join(lines) + "\n")


def _declare(kit: Path) -> None:
    """What a site does after adding its data: declare its public, rounded size in its privacy policy."""
    path = kit / "state" / "privacy-policy.toml"
    write_policy(replace(load_policy(path), declared_size=10), path)


def test_fresh_kits_pass_the_check_once_the_site_has_data(kits) -> None:
    assert not has_errors(check_kit(kits.coordinator_kit))
    for kit in kits.site_kits.values():
        assert "no train" in _messages(kit)
        _write_csv(kit / "data", 4)
        assert "declared_size is missing" in _messages(kit)
        _declare(kit)
        findings = check_kit(kit)
        assert not has_errors(findings), [f for f in findings if f.level == ERROR]


def test_existing_ca_is_reused_and_sites_can_be_added(tmp_path: Path, kits) -> None:
    ca = kits.ca_dir
    other = _provision(tmp_path / "other", federation="other", sites=["x"], ca_cert=ca / "ca.pem", ca_key=ca / "ca.key")
    assert other.ca_dir is None and not (tmp_path / "other" / "ca").exists()
    assert (other.site_kits["x"] / "tls" / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()

    first = _provision(tmp_path / "fed", sites=["a", "b"])
    before = {
        p: p.read_bytes()
        for p in (tmp_path / "fed").rglob("*")
        if p.is_file() and "manifest" not in p.name and p.suffix != ".sh"
    }
    added = _provision(tmp_path / "fed", sites=["c"])
    assert added.extended and added.coordinator_fingerprint == first.coordinator_fingerprint
    assert all(p.read_bytes() == content for p, content in before.items())
    assert sorted(read_manifest(added.coordinator_kit / "manifest.json", first.coordinator_fingerprint).sites) == [
        "a",
        "b",
        "c",
    ]
    assert "supernode-keys/c.pub" in (added.coordinator_kit / "register-supernodes.sh").read_text()
    _write_csv(first.site_kits["a"] / "data", 2)
    _declare(first.site_kits["a"])
    assert not has_errors(check_kit(first.site_kits["a"])), "an old site kit stays valid after a site is added"
    with pytest.raises(ProvisionError, match="already in federation"):
        _provision(tmp_path / "fed", sites=["a"])


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="HOST:PORT"):
        Endpoint.parse("coordinator.example.org")
    with pytest.raises(ProvisionError, match="listed twice"):
        _provision(tmp_path / "a", sites=["a", "a"])
    with pytest.raises(ProvisionError, match="reserved"):
        _provision(tmp_path / "b", sites=["coordinator"])
    with pytest.raises(ProvisionError, match="both --ca-cert and --ca-key"):
        _provision(tmp_path / "c", ca_cert=tmp_path / "x.pem")


def _messages(kit: Path, **kw) -> str:
    return "\n".join(f.message for f in check_kit(kit, **kw) if f.level == ERROR)


def test_check_finds_what_is_wrong_with_a_broken_site_kit(tmp_path: Path) -> None:
    result = _provision(tmp_path / "out", sites=["a", "b"])
    kit = result.site_kits["a"]
    os.chmod(kit / "keys" / "a.sign.key", 0o644)
    (kit / "state" / "privacy-policy.toml").write_text("[privacy]\nmax_epsilon = -1\ndelta = 1e-5\n")
    (kit / "data" / "train.csv").write_text("f0,f1,label\n1,2,0\n")
    (result.site_kits["b"] / "manifest.json").replace(kit / "manifest.json")
    text = _messages(kit)
    assert "chmod 600" in text
    assert "max_epsilon" in text
    assert "test.csv" in text

    moved = tmp_path / "elsewhere"
    result.site_kits["b"].rename(moved)
    assert "was made to live at" in _messages(moved)
    assert "not a fedtransfer kit" in _messages(tmp_path)


def test_a_supernode_script_changed_to_insecure_fails_the_check(tmp_path: Path) -> None:
    """Flower's SuperNode retries forever with --insecure against the TLS gateway; the check says why instead."""
    kit = _provision(tmp_path / "out", sites=["a", "b"]).site_kits["a"]
    script = kit / "start-supernode.sh"
    text = script.read_text()
    script.write_text(text.replace("--root-certificates", "--insecure \\\n  --ignored"))
    messages = _messages(kit)
    assert "--insecure" in messages and "speaks only TLS" in messages
    assert "does not pass --root-certificates" in messages


def test_check_finds_a_kit_from_another_federation(tmp_path: Path) -> None:
    ours = _provision(tmp_path / "ours", sites=["a"])
    theirs = _provision(tmp_path / "theirs", federation="theirs", sites=["a"])
    kit = ours.site_kits["a"]
    (kit / "manifest.json").write_bytes((theirs.site_kits["a"] / "manifest.json").read_bytes())
    assert "confirm the fingerprint" in _messages(kit)


def test_check_validates_data_against_the_model_card(tmp_path: Path) -> None:
    from common.model.checkpoint import save_checkpoint
    from common.model.zoo import build_model

    result = _provision(tmp_path / "out", sites=["a"])
    kit = result.site_kits["a"]
    _write_csv(kit / "data", 2)
    card_dir = tmp_path / "ckpt"
    model = build_model("logreg", [3], 2, {})
    save_checkpoint(
        model,
        card_dir,
        arch="logreg",
        arch_args={},
        input_shape=[3],
        class_names=["no", "yes"],
        source_description="test",
    )
    assert "train.csv" in _messages(kit, model_card=card_dir)
    _write_csv(kit / "data", 3)
    _declare(kit)
    assert not has_errors(check_kit(kit, model_card=card_dir))


def test_cli_provision_and_check(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli_deploy.add_commands(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "kits"
    args = parser.parse_args(
        [
            "provision",
            "--federation",
            "demo",
            "--sites",
            "a,b",
            "--superlink-address",
            "127.0.0.1:9000",
            "--out",
            str(out),
            "--runtime-port",
            "9500",
        ]
    )
    assert args.func(args) == 0
    assert KitInfo.load(out / "sites" / "b").runtime_port == 9501
    assert "--host 127.0.0.1 --port 9001" in (out / "coordinator" / "start-superlink.sh").read_text()
    assert "--listen 127.0.0.1:9000" in (out / "coordinator" / "start-gateway.sh").read_text()
    _write_csv(out / "sites" / "a" / "data", 2)
    _declare(out / "sites" / "a")
    check = parser.parse_args(["site", "check", "--kit", str(out / "sites" / "a")])
    assert check.func(check) == 0
    os.chmod(out / "sites" / "a" / "flower" / "supernode-auth.key", 0o640)
    assert check.func(check) == 1
    again = parser.parse_args(
        [
            "provision",
            "--federation",
            "other",
            "--sites",
            "c",
            "--superlink-address",
            "127.0.0.1:9000",
            "--out",
            str(out),
        ]
    )
    assert again.func(again) == 1


def test_a_coordinator_kit_that_exposes_the_superlink_fails_the_check(tmp_path: Path) -> None:
    """Finding 1 of the security review: the SuperLink served its Control API where the sites dial."""
    kit = _provision(tmp_path / "out").coordinator_kit
    assert any(f.check == "control plane" and f.level == "ok" for f in check_kit(kit))
    exposed = replace(KitInfo.load(kit), control_address="0.0.0.0:8000")
    (kit / "kit.json").write_text(json.dumps(asdict(exposed)))
    assert any(f.check == "control plane" and f.level == ERROR for f in check_kit(kit))
