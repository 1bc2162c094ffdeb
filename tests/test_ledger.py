"""Tests for common.privacy.ledger: chain verification, tamper detection, durability, locking."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os

import pytest

from common.privacy.accounting import Step
from common.privacy.ledger import (
    GENESIS_HASH,
    HEAD_FILE,
    LEDGER_FILE,
    STATE_IN_USE_FILE,
    Ledger,
    LedgerError,
    LedgerLocked,
    LedgerTampered,
    LedgerUnsigned,
    entry_hash,
    signed_head,
)
from common.security.keys import Identity

SITE = Identity.generate("site-a")
OTHER = Identity.generate("site-a")  # same name, another key: what a forger without the site's key could sign with


def fields(server_round: int, dataset_id: str = "d" * 64) -> dict:
    return dict(
        dataset_id=dataset_id,
        run_id="run-1",
        server_round=server_round,
        noise_multiplier=1.1,
        sample_rate=0.02,
        steps=50,
        max_grad_norm=1.0,
        delta=1e-5,
        epsilon=0.5 * server_round,
        accountant="prv",
        reference_epsilon=0.7 * server_round,
        reference_accountant="rdp",
        model_fingerprint="f" * 64,
        kind="train",
        noise="csprng",
    )


def filled(tmp_path, n: int = 4) -> Ledger:
    ledger = Ledger(tmp_path, signer=SITE)
    with ledger.lock():
        for r in range(1, n + 1):
            ledger.append(**fields(r, dataset_id="a" * 64 if r % 2 else "b" * 64))
    return ledger


def lines(tmp_path) -> list[str]:
    return (tmp_path / LEDGER_FILE).read_text().splitlines(keepends=True)


def rewrite(tmp_path, new_lines) -> None:
    (tmp_path / LEDGER_FILE).write_text("".join(new_lines))


def test_append_and_reload(tmp_path):
    filled(tmp_path)
    ledger = Ledger(tmp_path)
    assert ledger.verify() == 4
    entries = ledger.entries()
    assert [e.index for e in entries] == [0, 1, 2, 3]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    assert [e.server_round for e in ledger.entries("a" * 64)] == [1, 3]
    assert ledger.history("b" * 64) == [Step(1.1, 0.02, 50)] * 2
    assert Ledger(tmp_path / "empty").entries() == []


def test_append_requires_the_lock(tmp_path):
    with pytest.raises(LedgerError, match="lock"):
        Ledger(tmp_path).append(**fields(1))


def test_edited_entry_is_detected(tmp_path):
    filled(tmp_path)
    content = lines(tmp_path)
    record = json.loads(content[1])
    record["epsilon"] = 0.01
    content[1] = json.dumps(record) + "\n"
    rewrite(tmp_path, content)
    with pytest.raises(LedgerTampered, match=r"entry 1 \(line 2\).*bad hash"):
        Ledger(tmp_path).verify()


def test_edited_entry_with_recomputed_hash_breaks_the_chain(tmp_path):
    filled(tmp_path)
    content = lines(tmp_path)
    record = json.loads(content[1])
    record["epsilon"] = 0.01
    record["hash"] = entry_hash(record)
    content[1] = json.dumps(record) + "\n"
    rewrite(tmp_path, content)
    with pytest.raises(LedgerTampered, match=r"entry 2 \(line 3\).*broken chain"):
        Ledger(tmp_path).verify()


def test_deleted_middle_entry_is_detected(tmp_path):
    filled(tmp_path)
    content = lines(tmp_path)
    del content[1]
    rewrite(tmp_path, content)
    with pytest.raises(LedgerTampered, match=r"entry 1 .*deleted"):
        Ledger(tmp_path).entries()


def test_deleted_last_entry_is_detected(tmp_path):
    filled(tmp_path)
    rewrite(tmp_path, lines(tmp_path)[:-1])
    with pytest.raises(LedgerTampered, match=r"entry 3 .*deleted"):
        Ledger(tmp_path).verify()


def test_missing_head_is_detected(tmp_path):
    filled(tmp_path)
    (tmp_path / HEAD_FILE).unlink()
    with pytest.raises(LedgerTampered, match="missing"):
        Ledger(tmp_path).verify()


def test_reordered_entries_are_detected(tmp_path):
    filled(tmp_path)
    content = lines(tmp_path)
    content[1], content[2] = content[2], content[1]
    rewrite(tmp_path, content)
    with pytest.raises(LedgerTampered, match=r"entry 1 \(line 2\).*reordered"):
        Ledger(tmp_path).verify()


def test_bad_format_is_detected(tmp_path):
    filled(tmp_path)
    content = lines(tmp_path)
    content[0] = "not json\n"
    rewrite(tmp_path, content)
    with pytest.raises(LedgerTampered, match=r"line 1.*bad format"):
        Ledger(tmp_path).verify()


def test_disk_full_leaves_ledger_unchanged(tmp_path, monkeypatch):
    ledger = filled(tmp_path, 2)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    head_before = (tmp_path / HEAD_FILE).read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with ledger.lock():
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(LedgerError, match="must not be sent"):
            ledger.append(**fields(3))
        monkeypatch.undo()
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    assert (tmp_path / HEAD_FILE).read_bytes() == head_before
    assert Ledger(tmp_path).verify() == 2
    with ledger.lock():
        ledger.append(**fields(3))
    assert Ledger(tmp_path).verify() == 3


def test_interrupted_append_is_tolerated(tmp_path):
    filled(tmp_path, 2)
    (tmp_path / LEDGER_FILE).open("a").write('{"dataset_id": "trunc')
    ledger = Ledger(tmp_path, signer=SITE)
    assert ledger.verify() == 2
    with ledger.lock():
        ledger.append(**fields(3))
    assert ledger.verify() == 3


def _try_lock(state_dir, queue):
    try:
        with Ledger(state_dir).lock(timeout=0.3):
            queue.put("acquired")
    except LedgerLocked as exc:
        queue.put(f"locked: {exc}")


def test_lock_excludes_another_process(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    ledger = Ledger(tmp_path)
    with ledger.lock():
        child = ctx.Process(target=_try_lock, args=(tmp_path, queue))
        child.start()
        child.join(20)
        result = queue.get(timeout=5)
    assert result.startswith("locked") and "another process" in result
    child = ctx.Process(target=_try_lock, args=(tmp_path, queue))
    child.start()
    child.join(20)
    assert queue.get(timeout=5) == "acquired"


def _rechain(tmp_path, change) -> None:
    """Rewrite every entry with ``change``, recompute every hash and the chain: a consistent forgery."""
    previous = GENESIS_HASH
    rewritten = []
    for line in lines(tmp_path):
        record = json.loads(line)
        change(record)
        record["prev_hash"] = previous
        record["hash"] = previous = entry_hash(record)
        rewritten.append(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
    rewrite(tmp_path, rewritten)
    return previous, len(rewritten) - 1


def test_a_consistent_rewrite_fails_the_signed_head(tmp_path):
    filled(tmp_path)

    def fewer_steps(record):
        record["steps"], record["epsilon"] = 2, record["epsilon"] / 4

    last_hash, last_index = _rechain(tmp_path, fewer_steps)
    (tmp_path / HEAD_FILE).write_bytes(signed_head(last_index, last_hash, OTHER))
    assert Ledger(tmp_path).verify() == 4  # without the site's key only the chain can be checked, and it is consistent
    with pytest.raises(LedgerTampered, match="signature does not verify"):
        Ledger(tmp_path, site_key=SITE.public()).verify()
    (tmp_path / HEAD_FILE).write_bytes(json.dumps({"index": last_index, "hash": last_hash}).encode())
    with pytest.raises(LedgerUnsigned, match="sign-ledger"):
        Ledger(tmp_path, site_key=SITE.public()).verify()


def test_a_wiped_ledger_is_detected_while_the_state_is_in_use(tmp_path):
    Ledger(tmp_path, signer=SITE).initialise()
    assert Ledger(tmp_path, site_key=SITE.public()).verify() == 0
    (tmp_path / STATE_IN_USE_FILE).write_bytes(b"k" * 32)
    filled(tmp_path, 2)
    (tmp_path / LEDGER_FILE).unlink()
    (tmp_path / HEAD_FILE).unlink()
    with pytest.raises(LedgerTampered, match="deleted"):
        Ledger(tmp_path, site_key=SITE.public()).verify()


def test_an_unsigned_head_is_signed_once_by_the_site(tmp_path):
    filled(tmp_path, 3)
    last = Ledger(tmp_path).entries()[-1]
    (tmp_path / HEAD_FILE).write_bytes(json.dumps({"index": last.index, "hash": last.hash}).encode())
    with pytest.raises(LedgerUnsigned):
        Ledger(tmp_path, signer=SITE).verify()
    assert Ledger(tmp_path, signer=SITE).sign_head() == 3
    assert Ledger(tmp_path, site_key=SITE.public()).verify() == 3


def test_entries_written_before_the_noise_source_was_recorded_still_verify(tmp_path):
    old = {k: v for k, v in fields(1).items() if k != "noise"}
    old |= {"time": "2026-01-01T00:00:00+00:00", "index": 0, "prev_hash": GENESIS_HASH}
    old["hash"] = entry_hash(old)
    (tmp_path / LEDGER_FILE).write_text(json.dumps(old) + "\n")
    (tmp_path / HEAD_FILE).write_bytes(signed_head(0, old["hash"], SITE))
    (entry,) = Ledger(tmp_path, site_key=SITE.public()).entries()
    assert entry.noise == "unrecorded"
