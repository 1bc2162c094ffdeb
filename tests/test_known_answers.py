"""Known-answer vectors for the formats that cross a boundary: envelope, signed instruction, manifest, ledger.

Fixed keys, nonce and times must give exactly the bytes in ``tests/golden/known-answers.json``,
and those bytes must still open and verify. A change that alters any of them changes a wire
or disk format: bump its version and regenerate on purpose (``python -m tests.test_known_answers``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.privacy.ledger import HEAD_FILE, LEDGER_FILE, Ledger
from common.security.envelope import EnvelopeContext, _seal_with, open_envelope, sign_instruction, verify_instruction
from common.security.keys import Identity
from common.security.manifest import Manifest, _sign_manifest_at

VECTORS = Path(__file__).parent / "golden" / "known-answers.json"


def _identity(name: str, seed: int) -> Identity:
    return Identity(
        name,
        X25519PrivateKey.from_private_bytes(bytes([seed] * 32)),
        Ed25519PrivateKey.from_private_bytes(bytes([seed + 1] * 32)),
    )


COORDINATOR, SITE = _identity("coordinator", 1), _identity("hospital-a", 3)
RUN_ID = "0123456789abcdef0123456789abcdef"  # the coordinator's run id: 128 bits, hex
CONTEXT = EnvelopeContext(RUN_ID, server_round=3, site_id="hospital-a", kind="train-reply", base_model="ab" * 32)


def vectors() -> dict[str, str]:
    sealed = _seal_with(
        X25519PrivateKey.from_private_bytes(bytes([7] * 32)),
        bytes(range(12)),
        b"payload",
        CONTEXT,
        SITE,
        COORDINATOR.public(),
    )
    instruction = sign_instruction(
        b'{"config":{},"arrays":"00"}', EnvelopeContext(RUN_ID, 3, "*", "train-instruction", "ab" * 32), COORDINATOR
    )
    manifest = _sign_manifest_at("kat-federation", COORDINATOR, [SITE.public()], "2026-01-01T00:00:00+00:00")
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder), signer=SITE)
        with ledger.lock():
            ledger.append(
                dataset_id="cd" * 32,
                run_id=RUN_ID,
                server_round=3,
                noise_multiplier=1.5,
                sample_rate=0.25,
                steps=8,
                max_grad_norm=1.0,
                delta=1e-5,
                epsilon=1.25,
                accountant="prv",
                reference_epsilon=1.5,
                reference_accountant="rdp",
                model_fingerprint="ef" * 32,
                kind="train",
                noise="csprng",
                time="2026-01-01T00:00:00+00:00",
            )
        line, head = (Path(folder) / LEDGER_FILE).read_text(), (Path(folder) / HEAD_FILE).read_text()
    return {
        "sealed-update-sha256": hashlib.sha256(sealed).hexdigest(),
        "sealed-update-length": str(len(sealed)),
        "signed-instruction-hex": instruction.hex(),
        "manifest-json": manifest.to_json(),
        "ledger-line": line,
        "ledger-head": head,
    }


def test_fixed_keys_nonces_and_times_give_the_recorded_bytes() -> None:
    assert vectors() == json.loads(VECTORS.read_text())


def test_the_recorded_bytes_still_open_and_verify() -> None:
    recorded = json.loads(VECTORS.read_text())
    sealed = _seal_with(
        X25519PrivateKey.from_private_bytes(bytes([7] * 32)),
        bytes(range(12)),
        b"payload",
        CONTEXT,
        SITE,
        COORDINATOR.public(),
    )
    assert open_envelope(sealed, CONTEXT, COORDINATOR, {"hospital-a": SITE.public()}) == b"payload"
    assert (
        verify_instruction(
            bytes.fromhex(recorded["signed-instruction-hex"]),
            EnvelopeContext(RUN_ID, 3, "hospital-a", "train-instruction", "ab" * 32),
            COORDINATOR.public(),
        )
        == b'{"config":{},"arrays":"00"}'
    )
    manifest = Manifest.from_json(recorded["manifest-json"], COORDINATOR.public().fingerprint())
    assert manifest.site("hospital-a") == SITE.public()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / LEDGER_FILE).write_text(recorded["ledger-line"])
        (Path(folder) / HEAD_FILE).write_text(recorded["ledger-head"])
        assert Ledger(Path(folder), site_key=SITE.public()).verify() == 1


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(vectors(), indent=1) + "\n")
    print(f"wrote {VECTORS}", file=sys.stderr)
