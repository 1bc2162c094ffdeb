import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from common.security.keys import Identity, PublicIdentity
from common.security.manifest import (
    Manifest,
    ManifestError,
    ManifestExpired,
    ManifestFingerprintMismatch,
    ManifestFormatError,
    ManifestSignatureInvalid,
    UnknownSite,
    read_manifest,
    sign_manifest,
    write_manifest,
)

SITES = ("cleveland", "hungary", "switzerland", "va")


@pytest.fixture(scope="module")
def coordinator() -> Identity:
    return Identity.generate("coordinator")


@pytest.fixture(scope="module")
def sites() -> list[PublicIdentity]:
    return [Identity.generate(name).public() for name in SITES]


@pytest.fixture(scope="module")
def manifest(coordinator: Identity, sites: list[PublicIdentity]) -> Manifest:
    return sign_manifest("heart-disease", coordinator, sites)


def test_round_trip_through_json(manifest: Manifest, coordinator: Identity) -> None:
    fp = coordinator.public().fingerprint()
    loaded = Manifest.from_json(manifest.to_json(), fp)
    assert loaded == manifest
    assert set(loaded.sites) == set(SITES)
    assert loaded.coordinator == coordinator.public()
    assert datetime.fromisoformat(loaded.created).utcoffset().total_seconds() == 0


def test_round_trip_through_file(manifest: Manifest, coordinator: Identity, tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_manifest(manifest, path)
    assert read_manifest(path, coordinator.public().fingerprint()) == manifest
    assert (path.stat().st_mode & 0o777) == 0o644


def test_fingerprint_comparison_ignores_case_and_whitespace(manifest: Manifest, coordinator: Identity) -> None:
    fp = coordinator.public().fingerprint()
    assert Manifest.from_json(manifest.to_json(), f"  {fp.upper()}\n") == manifest


def test_no_expected_fingerprint_accepts_but_warns(manifest: Manifest, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="common.security.manifest"):
        Manifest.from_json(manifest.to_json(), None)
    assert "without checking the coordinator fingerprint" in caplog.text


def _tampered(manifest: Manifest, change) -> str:
    document = json.loads(manifest.to_json())
    change(document)
    return json.dumps(document)


def test_swapped_site_key_fails_signature(manifest: Manifest, coordinator: Identity) -> None:
    intruder = Identity.generate("hungary").public().to_dict()
    text = _tampered(manifest, lambda d: d["sites"].__setitem__("hungary", intruder))
    with pytest.raises(ManifestSignatureInvalid, match="invalid signature"):
        Manifest.from_json(text, coordinator.public().fingerprint())


def test_added_site_fails_signature(manifest: Manifest, coordinator: Identity) -> None:
    rogue = Identity.generate("rogue").public().to_dict()
    text = _tampered(manifest, lambda d: d["sites"].__setitem__("rogue", rogue))
    with pytest.raises(ManifestSignatureInvalid, match="altered after the coordinator signed"):
        Manifest.from_json(text, coordinator.public().fingerprint())


def test_changed_federation_name_fails_signature(manifest: Manifest, coordinator: Identity) -> None:
    text = _tampered(manifest, lambda d: d.__setitem__("federation", "other"))
    with pytest.raises(ManifestSignatureInvalid):
        Manifest.from_json(text, coordinator.public().fingerprint())


def test_removed_site_fails_signature(manifest: Manifest, coordinator: Identity) -> None:
    text = _tampered(manifest, lambda d: d["sites"].pop("va"))
    with pytest.raises(ManifestSignatureInvalid):
        Manifest.from_json(text, coordinator.public().fingerprint())


def test_wrong_expected_coordinator_fingerprint(manifest: Manifest) -> None:
    other = Identity.generate("coordinator").public().fingerprint()
    with pytest.raises(ManifestFingerprintMismatch, match="confirm the fingerprint") as info:
        Manifest.from_json(manifest.to_json(), other)
    assert other in str(info.value)


def test_manifest_re_signed_by_impostor_coordinator(
    manifest: Manifest, coordinator: Identity, sites: list[PublicIdentity]
) -> None:
    forged = sign_manifest("heart-disease", Identity.generate("coordinator"), sites)
    with pytest.raises(ManifestFingerprintMismatch):
        Manifest.from_json(forged.to_json(), coordinator.public().fingerprint())


def test_unknown_site(manifest: Manifest) -> None:
    assert manifest.site("va") == manifest.sites["va"]
    with pytest.raises(UnknownSite, match="'mallory' is not in the manifest") as info:
        manifest.site("mallory")
    assert "cleveland" in str(info.value)
    assert isinstance(info.value, ManifestError)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("not json", "not valid JSON"),
        ("[]", "not a fedtransfer manifest"),
        ('{"format": "fedtransfer-manifest", "version": 99}', "version 99"),
    ],
)
def test_malformed_manifest(text: str, reason: str) -> None:
    with pytest.raises(ManifestFormatError, match=reason):
        Manifest.from_json(text, None)


def test_site_listed_under_another_id_is_rejected(manifest: Manifest) -> None:
    def relabel(document: dict) -> None:
        document["sites"]["cleveland"] = document["sites"]["hungary"]

    with pytest.raises(ManifestFormatError, match="under site id 'cleveland'"):
        Manifest.from_json(_tampered(manifest, relabel), None)


def test_duplicate_sites_and_shared_keys_are_rejected(coordinator: Identity) -> None:
    site = Identity.generate("cleveland").public()
    with pytest.raises(ManifestFormatError, match="listed twice"):
        sign_manifest("f", coordinator, [site, site])
    clone = PublicIdentity("hungary", site.encryption_key, site.signing_key)
    with pytest.raises(ManifestFormatError, match="same keys"):
        sign_manifest("f", coordinator, [site, clone])


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.json", None)


def test_declared_sizes_are_signed_and_checked(coordinator: Identity, sites: list[PublicIdentity]) -> None:
    signed = sign_manifest("heart-disease", coordinator, sites, declared_sizes={"va": 150})
    loaded = Manifest.from_json(signed.to_json(), coordinator.public().fingerprint())
    assert loaded.declared_size("va") == 150 and loaded.declared_size("hungary") is None
    text = _tampered(signed, lambda d: d["declared-sizes"].__setitem__("va", 15000))
    with pytest.raises(ManifestSignatureInvalid):
        Manifest.from_json(text, coordinator.public().fingerprint())
    for bad in ({"va": 0}, {"va": 1.5}, {"va": True}, {"mallory": 10}):
        with pytest.raises(ManifestFormatError, match="declared"):
            sign_manifest("heart-disease", coordinator, sites, declared_sizes=bad)


@pytest.mark.parametrize("name", ["cardio\n2026-01-01 INFO site hospital-a approved", "cardio\x1b[2J", "a\u2028b", ""])
def test_federation_names_with_control_characters_are_refused(
    name: str, manifest: Manifest, coordinator: Identity, sites: list[PublicIdentity]
) -> None:
    """Security review finding 9: newlines and ANSI escapes in the federation name make fake log lines."""
    with pytest.raises(ManifestFormatError, match="printable"):
        sign_manifest(name, coordinator, sites)
    with pytest.raises(ManifestFormatError, match="printable"):
        Manifest.from_json(_tampered(manifest, lambda d: d.__setitem__("federation", name)), None)


def test_a_repeated_key_in_the_manifest_json_is_an_error(manifest: Manifest) -> None:
    """Security review finding 9: a duplicate key used to be accepted, the last one winning."""
    text = manifest.to_json()
    doubled = text.replace('"federation":', '"federation": "other",\n  "federation":', 1)
    with pytest.raises(ManifestFormatError, match="appears twice"):
        Manifest.from_json(doubled, None)


def test_a_manifest_expires(coordinator: Identity, sites: list[PublicIdentity]) -> None:
    signed = sign_manifest("heart-disease", coordinator, sites, validity_days=30)
    signed.check_current()
    later = datetime.fromisoformat(signed.expires) + timedelta(seconds=1)
    assert signed.expired(later)
    with pytest.raises(ManifestExpired, match="expired on"):
        signed.check_current(later)
    assert not sign_manifest("heart-disease", coordinator, sites, validity_days=0).expired(later)


def test_a_revoked_key_cannot_be_listed(coordinator: Identity, sites: list[PublicIdentity]) -> None:
    revoked = {sites[0].fingerprint(): "2026-01-01T00:00:00+00:00"}
    with pytest.raises(ManifestFormatError, match="revoked"):
        sign_manifest("heart-disease", coordinator, sites, revoked=revoked)
    signed = sign_manifest("heart-disease", coordinator, sites[1:], revoked=revoked, serial=2)
    assert Manifest.from_json(signed.to_json(), None).revoked == revoked


def test_a_key_rotation_carries_the_old_keys_endorsement(coordinator: Identity, sites: list[PublicIdentity]) -> None:
    new = Identity.generate("coordinator")
    rotated = sign_manifest("heart-disease", new, sites, serial=2, previous=coordinator)
    loaded = Manifest.from_json(rotated.to_json(), new.public().fingerprint())
    assert loaded.endorsed_by(coordinator.public()) and not loaded.endorsed_by(new.public())
    forged = _tampered(rotated, lambda d: d.__setitem__("endorsement", json.loads(rotated.to_json())["signature"]))
    with pytest.raises(ManifestSignatureInvalid, match="endorsement"):
        Manifest.from_json(forged, None)
