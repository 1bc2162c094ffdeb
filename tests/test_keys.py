import json
import stat
from pathlib import Path

import pytest

from common.security import keys
from common.security.keys import (
    Identity,
    KeyFileError,
    PublicIdentity,
    passphrase_from_env,
    prompt_passphrase,
    read_identity,
    read_public_identity,
    write_identity,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _same_keys(a: Identity, b: Identity) -> bool:
    return a.public() == b.public()


def test_fingerprint_is_sha256_hex_and_depends_on_both_keys() -> None:
    identity = Identity.generate("cleveland")
    public = identity.public()
    fp = public.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    same = PublicIdentity(public.name, public.encryption_key, public.signing_key)
    assert fp == same.fingerprint()
    other = Identity.generate("cleveland").public()
    assert PublicIdentity("x", public.encryption_key, other.signing_key).fingerprint() != fp
    assert PublicIdentity("x", other.encryption_key, public.signing_key).fingerprint() != fp


def test_public_identity_rejects_bad_key_lengths_and_names() -> None:
    good = Identity.generate("site-a").public()
    with pytest.raises(ValueError, match="32 raw bytes"):
        PublicIdentity("site-a", good.encryption_key[:31], good.signing_key)
    for bad_name in ("", "*", "../etc", ".hidden", "a" * 65, "with space"):
        with pytest.raises(ValueError, match="invalid participant name"):
            Identity.generate(bad_name)


def test_identity_repr_hides_private_keys() -> None:
    assert "PrivateKey" not in repr(Identity.generate("hungary"))


def test_private_keys_are_0600_and_public_file_0644(tmp_path: Path) -> None:
    write_identity(Identity.generate("hungary"), tmp_path)
    assert _mode(tmp_path / "hungary.enc.key") == 0o600
    assert _mode(tmp_path / "hungary.sign.key") == 0o600
    assert _mode(tmp_path / "hungary.pub.json") == 0o644


def test_round_trip_without_passphrase(tmp_path: Path) -> None:
    identity = Identity.generate("va")
    write_identity(identity, tmp_path)
    loaded = read_identity(tmp_path, "va")
    assert _same_keys(identity, loaded)
    assert b"ENCRYPTED" not in (tmp_path / "va.enc.key").read_bytes()


def test_passphrase_round_trip(tmp_path: Path) -> None:
    identity = Identity.generate("va")
    write_identity(identity, tmp_path, passphrase=b"correct horse")
    sealed = json.loads((tmp_path / "va.sign.key").read_text())
    assert sealed["kdf"]["name"] == "scrypt" and sealed["kdf"]["n"] >= 2**17
    assert _same_keys(identity, read_identity(tmp_path, "va", passphrase=b"correct horse"))


def test_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    write_identity(Identity.generate("va"), tmp_path, passphrase=b"correct horse")
    with pytest.raises(KeyFileError, match="wrong passphrase") as info:
        read_identity(tmp_path, "va", passphrase=b"battery staple")
    assert "va.enc.key" in str(info.value)


def test_missing_passphrase_for_encrypted_key_says_what_to_do(tmp_path: Path) -> None:
    write_identity(Identity.generate("va"), tmp_path, passphrase=b"pw")
    with pytest.raises(KeyFileError, match="FEDTRANSFER_KEY_PASSPHRASE"):
        read_identity(tmp_path, "va")


def test_passphrase_for_unencrypted_key_is_refused(tmp_path: Path) -> None:
    write_identity(Identity.generate("va"), tmp_path)
    with pytest.raises(KeyFileError, match="not encrypted"):
        read_identity(tmp_path, "va", passphrase=b"pw")


def _legacy_pbkdf2_identity(identity: Identity, folder: Path, passphrase: bytes) -> None:
    """Key files as versions before Scrypt wrote them: PKCS8 PEM under BestAvailableEncryption (PBKDF2)."""
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(mode=0o700, exist_ok=True)
    write_identity(identity, folder / "fresh")
    (folder / "fresh" / "va.pub.json").rename(folder / "va.pub.json")
    for suffix, key in (("enc", identity.encryption_key), ("sign", identity.signing_key)):
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        keys.write_private_file(folder / f"va.{suffix}.key", pem)


def test_a_pbkdf2_key_of_an_older_version_is_read_and_sealed_again_with_scrypt(tmp_path: Path) -> None:
    identity = Identity.generate("va")
    _legacy_pbkdf2_identity(identity, tmp_path, b"old pw")
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "va.enc.key").read_bytes()
    assert _same_keys(identity, read_identity(tmp_path, "va", passphrase=b"old pw"))
    for suffix in ("enc", "sign"):
        path = tmp_path / f"va.{suffix}.key"
        assert json.loads(path.read_text())["kdf"]["name"] == "scrypt"
        assert _mode(path) == 0o600
    assert _same_keys(identity, read_identity(tmp_path, "va", passphrase=b"old pw"))


def test_a_pbkdf2_key_with_the_wrong_passphrase_is_left_as_it_was(tmp_path: Path) -> None:
    _legacy_pbkdf2_identity(Identity.generate("va"), tmp_path, b"old pw")
    before = (tmp_path / "va.enc.key").read_bytes()
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        read_identity(tmp_path, "va", passphrase=b"guess")
    assert (tmp_path / "va.enc.key").read_bytes() == before


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d["kdf"].update(n=2**10), "wrong passphrase"),
        (lambda d: d["kdf"].update(n=2**30), "outside"),
        (lambda d: d["kdf"].update(n=3000), "power of two"),
        (lambda d: d.update(cipher="none"), "unexpected fields or cipher"),
        (lambda d: d.update(extra=1), "unexpected fields"),
        (lambda d: d.update(ciphertext=d["ciphertext"][:-8] + "AAAAAAA="), "wrong passphrase"),
    ],
)
def test_a_changed_scrypt_key_file_is_refused(tmp_path: Path, change, match) -> None:
    write_identity(Identity.generate("va"), tmp_path, passphrase=b"pw")
    path = tmp_path / "va.enc.key"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match=match):
        read_identity(tmp_path, "va", passphrase=b"pw")


def test_empty_passphrase_is_refused_when_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        write_identity(Identity.generate("va"), tmp_path, passphrase=b"")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    write_identity(Identity.generate("swiss"), tmp_path)
    (tmp_path / "swiss.sign.key").chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600") as info:
        read_identity(tmp_path, "swiss")
    assert "swiss.sign.key" in str(info.value)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_key_folder_others_may_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    """Security review finding 9: an existing 0777 key folder was used without warning."""
    folder = tmp_path / "keys"
    write_identity(Identity.generate("swiss"), folder)
    folder.chmod(mode)
    with pytest.raises(KeyFileError, match=f"chmod 700 {folder}"):
        read_identity(folder, "swiss")
    with pytest.raises(KeyFileError, match="writable by its group or by others"):
        write_identity(Identity.generate("va"), folder)
    assert not (folder / "va.sign.key").exists()
    folder.chmod(0o700)
    assert read_identity(folder, "swiss").name == "swiss"


def test_refuses_to_overwrite_existing_keys(tmp_path: Path) -> None:
    first = Identity.generate("swiss")
    write_identity(first, tmp_path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_identity(Identity.generate("swiss"), tmp_path)
    assert _same_keys(first, read_identity(tmp_path, "swiss"))


def test_refuses_to_overwrite_even_if_only_one_key_exists(tmp_path: Path) -> None:
    (tmp_path / "swiss.sign.key").write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_identity(Identity.generate("swiss"), tmp_path)
    assert not (tmp_path / "swiss.enc.key").exists()
    assert (tmp_path / "swiss.sign.key").read_bytes() == b"precious"


def test_missing_private_key_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found") as info:
        read_identity(tmp_path, "nobody")
    assert str(tmp_path / "nobody.enc.key") in str(info.value)


def test_swapped_key_files_are_detected(tmp_path: Path) -> None:
    write_identity(Identity.generate("swiss"), tmp_path)
    enc, sign = tmp_path / "swiss.enc.key", tmp_path / "swiss.sign.key"
    enc_bytes, sign_bytes = enc.read_bytes(), sign.read_bytes()
    enc.write_bytes(sign_bytes)
    sign.write_bytes(enc_bytes)
    with pytest.raises(KeyFileError, match="not an X25519"):
        read_identity(tmp_path, "swiss")


def test_garbage_private_key_is_refused(tmp_path: Path) -> None:
    write_identity(Identity.generate("swiss"), tmp_path)
    (tmp_path / "swiss.enc.key").write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not a PKCS8 PEM"):
        read_identity(tmp_path, "swiss")


def test_public_identity_file_round_trip(tmp_path: Path) -> None:
    identity = Identity.generate("cleveland")
    write_identity(identity, tmp_path)
    public = read_public_identity(tmp_path / "cleveland.pub.json")
    assert public == identity.public()
    document = json.loads((tmp_path / "cleveland.pub.json").read_text())
    assert document["fingerprint"] == public.fingerprint()


def test_public_identity_file_with_swapped_key_is_refused(tmp_path: Path) -> None:
    write_identity(Identity.generate("cleveland"), tmp_path)
    path = tmp_path / "cleveland.pub.json"
    document = json.loads(path.read_text())
    document["signing_key"] = Identity.generate("x").public().to_dict()["signing_key"]
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match="fingerprint does not match"):
        read_public_identity(path)


def test_public_identity_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found"):
        read_public_identity(tmp_path / "absent.pub.json")
    (tmp_path / "bad.pub.json").write_text("{")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        read_public_identity(tmp_path / "bad.pub.json")
    (tmp_path / "other.pub.json").write_text("{}")
    with pytest.raises(KeyFileError, match="not a fedtransfer public identity"):
        read_public_identity(tmp_path / "other.pub.json")


def test_passphrase_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDTRANSFER_KEY_PASSPHRASE", raising=False)
    assert passphrase_from_env() is None
    monkeypatch.setenv("FEDTRANSFER_KEY_PASSPHRASE", "")
    assert passphrase_from_env() is None
    monkeypatch.setenv("FEDTRANSFER_KEY_PASSPHRASE", "pässword")
    assert passphrase_from_env() == "pässword".encode()
    monkeypatch.setenv("OTHER_VAR", "x")
    assert passphrase_from_env("OTHER_VAR") == b"x"


def test_prompt_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["secret", "secret", "secret", "typo", ""])
    monkeypatch.setattr(keys.getpass, "getpass", lambda prompt="": next(answers))
    assert prompt_passphrase(confirm=True) == b"secret"
    with pytest.raises(KeyFileError, match="differ"):
        prompt_passphrase(confirm=True)
    with pytest.raises(KeyFileError, match="empty passphrase"):
        prompt_passphrase(confirm=False)
