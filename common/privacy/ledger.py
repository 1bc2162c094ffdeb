"""The site's privacy ledger: append-only, hash-chained, durable, on the site's disk.

Files in the site's state directory:

- ``privacy-ledger.jsonl``: one JSON object per line, one line per training round
  (:class:`LedgerEntry`). Each entry carries its ``index`` (0, 1, 2, ...), the
  ``hash`` of the previous entry (``prev_hash``; the first entry uses
  :data:`GENESIS_HASH`) and its own ``hash``: the SHA-256 of the canonical JSON
  (sorted keys, no spaces, ASCII) of all its other fields.
- ``privacy-ledger.head``: the index and hash of the last entry, signed by the site's
  Ed25519 key (:class:`~common.security.keys.Identity`) and replaced atomically after
  every append. It anchors the end of the chain, so deleting the last lines is
  detected, and its signature means that whoever rewrites the chain, even consistently
  with recomputed hashes and epsilons, must also hold the site's private key. A new
  state directory starts with a signed genesis head (index -1), so a ledger that was
  wiped while the state directory stayed in use (its dataset-identity key is still
  there) is detected too. A ledger without a head, or with an unsigned head, is
  refused by the site's budget guard.
- ``privacy-ledger.lock``: the file locked (``fcntl.flock``) by whoever appends.

Every append is written, flushed and fsynced (file and directory) before it
returns. If the write fails (disk full, I/O error) the file is truncated back and
:class:`LedgerError` is raised: the caller must then not send its update.
A crash between the ledger write and the head update leaves the head one entry
behind; that is accepted (the entry counts, which is the conservative reading) and
repaired by the next append. An incomplete last line from a crash mid-write is
ignored by readers and removed by the next append.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from common.errors import PrivacyError
from common.io import canonical_json, fsync_dir, parse_json, write_atomic
from common.privacy.accounting import Step
from common.security.keys import Identity, PublicIdentity

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.jsonl"
HEAD_FILE = "privacy-ledger.head"
LOCK_FILE = "privacy-ledger.lock"
NON_PRIVATE_DIR = "non-private-datasets"  # one marker file per dataset ever trained without DP
#: prev_hash of the first entry: 64 zeros (the SHA-256 width).
GENESIS_HASH = "0" * 64
#: The file whose presence means the state directory has been used (the dataset-identity key).
STATE_IN_USE_FILE = "dataset-id.key"
#: Where the random source of each entry is recorded: the operating system's CSPRNG, or a
#: seeded generator (reproducible, not private); "unrecorded" for entries written before it was.
NOISE_UNRECORDED = "unrecorded"
_HEAD_DOMAIN = b"fedtransfer-ledger-head-v1\x00"

#: Entry kinds: a DP-SGD training round, a run's private personalisation after its last round,
#: and the DP releases (Gaussian mechanism, sample rate 1, one step each): a federated evaluation,
#: the evaluation of the privately personalised copy, a training loss.
TRAIN, PERSONALISE = "train", "personalise"
EVALUATE, PERSONALISED_EVALUATE, LOSS = "evaluate", "personalised-evaluate", "train-loss"
RELEASE_KINDS = (EVALUATE, PERSONALISED_EVALUATE, LOSS)
LEDGER_KINDS = (TRAIN, PERSONALISE, *RELEASE_KINDS)


class LedgerError(PrivacyError):
    """The ledger cannot be read or written; nothing was recorded."""


class LedgerTampered(LedgerError):
    """The ledger on disk does not verify: an entry was edited, deleted or reordered."""


class LedgerLocked(LedgerError):
    """Another process holds the ledger lock."""


class LedgerUnsigned(LedgerError):
    """The head anchor carries no signature (a ledger written before heads were signed)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded training round; ``epsilon`` is the dataset's total after this round."""

    dataset_id: str
    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon: float
    accountant: str
    reference_epsilon: float
    reference_accountant: str
    model_fingerprint: str
    kind: str
    time: str
    index: int
    prev_hash: str
    hash: str
    noise: str = NOISE_UNRECORDED

    def to_step(self) -> Step:
        return Step(self.noise_multiplier, self.sample_rate, self.steps)


_TYPES: dict[str, type] = {
    "dataset_id": str,
    "run_id": str,
    "server_round": int,
    "noise_multiplier": float,
    "sample_rate": float,
    "steps": int,
    "max_grad_norm": float,
    "delta": float,
    "epsilon": float,
    "accountant": str,
    "reference_epsilon": float,
    "reference_accountant": str,
    "model_fingerprint": str,
    "kind": str,
    "time": str,
    "index": int,
    "prev_hash": str,
    "hash": str,
    "noise": str,
}
_FIELD_NAMES = tuple(f.name for f in fields(LedgerEntry))
#: Entries written before the random source was recorded lack ``noise``; they still verify.
_FIELD_SETS = (frozenset(_FIELD_NAMES), frozenset(_FIELD_NAMES) - {"noise"})
_CALLER_FIELDS = tuple(n for n in _FIELD_NAMES if n not in ("time", "index", "prev_hash", "hash"))


def entry_hash(data: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of every field except ``hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in data.items() if k != "hash"})).hexdigest()


def _coerce(name: str, value: Any) -> Any:
    kind = _TYPES[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise LedgerError(f"ledger field {name} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise LedgerError(f"ledger field {name} must be finite, got {value!r}")
    return value


def _head_statement(index: int, hash_: str, site: str) -> bytes:
    return _HEAD_DOMAIN + canonical_json({"index": index, "hash": hash_, "site": site})


def signed_head(index: int, hash_: str, signer: Identity) -> bytes:
    """The head anchor for entry ``index`` (-1: none yet) with ``hash_``, signed by the site."""
    signature = signer.signing_key.sign(_head_statement(index, hash_, signer.name))
    head = {
        "index": index,
        "hash": hash_,
        "site": signer.name,
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return canonical_json(head) + b"\n"


@dataclass
class _Chain:
    entries: list[LedgerEntry]
    good_size: int  # bytes of complete lines; beyond it lies an incomplete last line
    head_raw: bytes | None  # the head anchor's bytes as read (restored if an append fails)


class Ledger:
    """The privacy ledger of one site state directory (all datasets of the site).

    ``signer`` (the site's identity) is needed to append; ``site_key`` (its public half,
    taken from ``signer`` if not given) makes every read verify the head's signature.
    Without either, reads verify the chain and anchor only (``head_signature_checked``
    says which happened).
    """

    def __init__(self, state_dir: Path, signer: Identity | None = None, site_key: PublicIdentity | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.signer = signer
        self.site_key = site_key or (signer.public() if signer else None)
        self.head_signature_checked = False
        self.path = self.state_dir / LEDGER_FILE
        self.head_path = self.state_dir / HEAD_FILE
        self.lock_path = self.state_dir / LOCK_FILE
        self._thread_lock = threading.Lock()
        self._holder: int | None = None
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # locking -------------------------------------------------------------------------

    def _held_here(self) -> bool:
        return self._holder == threading.get_ident()

    @contextlib.contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the exclusive ledger lock (across processes) for the block.

        Raises :class:`LedgerLocked` if it cannot be taken within ``timeout`` seconds.
        Not re-entrant: taking it twice in one thread raises LedgerError.
        """
        if self._held_here():
            raise LedgerError("the ledger lock is already held by this thread")
        deadline = time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=max(timeout, 0.0)):
            raise LedgerLocked(
                f"{self.lock_path}: another thread of this process has held the privacy "
                f"ledger lock for more than {timeout:g} s"
            )
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                self._flock(fd, fcntl.LOCK_EX, deadline, timeout)
                os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)  # fixed width: overwrites the last holder's
                self._holder = threading.get_ident()
                try:
                    yield
                finally:
                    self._holder = None
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            self._thread_lock.release()

    def _flock(self, fd: int, mode: int, deadline: float, timeout: float) -> None:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LedgerError(f"{self.lock_path}: cannot lock: {exc}") from exc
            if time.monotonic() >= deadline:
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = f" (pid {int(self.lock_path.read_text().strip())})"
                raise LedgerLocked(
                    f"{self.lock_path}: another process{holder} holds the privacy ledger "
                    f"lock; gave up after {timeout:g} s. Wait for its round to finish, or "
                    "check that no stale site process is still running."
                )
            time.sleep(0.02)

    @contextlib.contextmanager
    def _reading(self, timeout: float = 30.0) -> Iterator[None]:
        """A shared lock for readers, unless this thread already holds the exclusive one."""
        if self._held_here():
            yield
            return
        deadline = time.monotonic() + timeout
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._flock(fd, fcntl.LOCK_SH, deadline, timeout)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # reading and verifying --------------------------------------------------------------

    def _tampered(self, where: str, what: str) -> LedgerTampered:
        return LedgerTampered(
            f"{self.path}: {where}: {what}. The privacy ledger no longer proves the spend; "
            "keep this file for investigation, and do not train on the affected datasets "
            "until the privacy officer has restored it from a backup."
        )

    def _read_head(self) -> tuple[dict[str, Any] | None, bytes | None]:
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise LedgerError(f"{self.head_path}: cannot read: {exc}") from exc
        try:
            head = parse_json(raw)
            if not (isinstance(head.get("index"), int) and isinstance(head.get("hash"), str)):
                raise ValueError("missing index or hash")
        except (ValueError, AttributeError) as exc:
            raise LedgerTampered(f"{self.head_path}: head anchor is malformed ({exc})") from exc
        self._check_signature(head)
        return head, raw

    def _check_signature(self, head: dict[str, Any]) -> None:
        self.head_signature_checked = False
        if self.site_key is None:
            return
        if "signature" not in head:
            raise LedgerUnsigned(
                f"{self.head_path}: the head anchor is not signed (it was written by a version of fedtransfer "
                "that did not sign it), so a consistent rewrite of the ledger could not be detected. After the "
                "privacy officer has checked the ledger (fedtransfer audit), sign it once with "
                "`fedtransfer site sign-ledger SITE_FOLDER`; until then this site trains on nothing."
            )
        try:
            signature = base64.b64decode(str(head["signature"]), validate=True)
            self.site_key.signing_public_key().verify(
                signature, _head_statement(head["index"], head["hash"], self.site_key.name)
            )
        except (binascii.Error, ValueError, InvalidSignature) as exc:
            raise self._tampered(
                f"head anchor {self.head_path.name}",
                f"its signature does not verify under site {self.site_key.name}'s key "
                f"{self.site_key.fingerprint()[:16]}... (rewritten, or signed by another key)",
            ) from exc
        if head.get("site") != self.site_key.name:
            raise self._tampered(f"head anchor {self.head_path.name}", f"it names site {head.get('site')!r}")
        self.head_signature_checked = True

    def _load(self) -> _Chain:
        head, head_raw = self._read_head()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot read: {exc}") from exc
        good_size = raw.rfind(b"\n") + 1
        torn = raw[good_size:]
        lines = raw[:good_size].splitlines()
        records: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            where = f"entry at line {number}"
            try:
                record = parse_json(line)
            except ValueError as exc:
                raise self._tampered(where, f"bad format, not JSON ({exc})") from exc
            if not isinstance(record, dict) or frozenset(record) not in _FIELD_SETS:
                raise self._tampered(where, "bad format, wrong set of fields")
            for name, kind in _TYPES.items():
                if name not in record:
                    continue
                value = record[name]
                ok = isinstance(value, kind) and not isinstance(value, bool)
                if kind is float:
                    ok = isinstance(value, float)
                if not ok:
                    raise self._tampered(where, f"bad format, field {name} is not {kind.__name__}")
            records.append(record)
        indices = [r["index"] for r in records]
        for position, record in enumerate(records):
            where = f"entry {position} (line {position + 1})"
            if record["index"] != position:
                if sorted(indices) == list(range(len(records))):
                    what = f"reordered: it holds index {record['index']}"
                elif record["index"] > position:
                    what = f"holds index {record['index']}, so entry {position} was deleted"
                else:
                    what = f"holds index {record['index']}: duplicated or reordered"
                raise self._tampered(where, what)
            if entry_hash(record) != record["hash"]:
                raise self._tampered(where, "bad hash, its content was edited")
            expected_prev = records[position - 1]["hash"] if position else GENESIS_HASH
            if record["prev_hash"] != expected_prev:
                raise self._tampered(where, "broken chain, prev_hash does not match the previous entry")
        count = len(records)
        if head is None:
            if count:
                raise self._tampered(
                    f"head anchor {self.head_path.name}",
                    f"missing while the ledger holds {count} entries",
                )
            if (self.state_dir / STATE_IN_USE_FILE).exists():
                raise self._tampered(
                    f"head anchor {self.head_path.name}",
                    f"missing while this state directory is in use (it holds {STATE_IN_USE_FILE}): "
                    "the ledger and its head were deleted",
                )
        elif head["index"] == -1:
            if head["hash"] != GENESIS_HASH:
                raise self._tampered(f"head anchor {self.head_path.name}", "a genesis anchor with a hash")
            if count > 1:
                raise self._tampered(f"entries 0..{count - 1}", "appended past the genesis anchor")
        else:
            last = head["index"]
            if last < 0 or last >= count:
                raise self._tampered(
                    f"entry {count} (line {count + 1})",
                    f"deleted: the head anchor records entries up to index {last}",
                )
            if records[last]["hash"] != head["hash"]:
                raise self._tampered(f"entry {last} (line {last + 1})", "does not match the head anchor")
            if last < count - 2:
                raise self._tampered(f"entries {last + 1}..{count - 1}", "appended past the head anchor")
            if last == count - 2:
                log.warning(
                    "%s: the last entry was written but the head anchor was not updated "
                    "(interrupted append); the entry counts and the anchor is repaired on "
                    "the next append",
                    self.path,
                )
        if torn:
            log.warning(
                "%s: ignoring an incomplete last line of %d bytes (interrupted write)",
                self.path,
                len(torn),
            )
        return _Chain([LedgerEntry(**r) for r in records], good_size, head_raw)

    def initialise(self) -> None:
        """Give a new state directory its signed genesis head (needs ``signer``); no-op if it has one."""
        if self.signer is None:
            raise LedgerError("Ledger.initialise needs the site's signing identity")
        if self.head_path.exists():  # heads are replaced, never removed: nothing to do (readers verify it)
            return
        with self.lock():
            if self._load().head_raw is None:
                write_atomic(self.head_path, signed_head(-1, GENESIS_HASH, self.signer))

    def sign_head(self) -> int:
        """Sign the current head of a ledger written before heads were signed; return its entry count.

        For the privacy officer's one-time migration (``fedtransfer site sign-ledger``): the
        chain and anchor must verify; only the missing signature is added.
        """
        if self.signer is None:
            raise LedgerError("signing the ledger head needs the site's signing identity")
        with self.lock():
            checking, self.site_key = self.site_key, None
            try:
                chain = self._load()
            finally:
                self.site_key = checking
            last = chain.entries[-1] if chain.entries else None
            write_atomic(
                self.head_path,
                signed_head(last.index if last else -1, last.hash if last else GENESIS_HASH, self.signer),
            )
            return len(chain.entries)

    def verify(self) -> int:
        """Verify the whole chain and its head anchor; return the number of entries."""
        with self._reading():
            return len(self._load().entries)

    def entries(self, dataset_id: str | None = None) -> list[LedgerEntry]:
        """All verified entries, optionally only those of one dataset."""
        with self._reading():
            chain = self._load().entries
        return [e for e in chain if dataset_id is None or e.dataset_id == dataset_id]

    def history(self, dataset_id: str) -> list[Step]:
        """The dataset's DP-SGD history, one Step per recorded round."""
        return [entry.to_step() for entry in self.entries(dataset_id)]

    # appending --------------------------------------------------------------------------

    def append(self, **fields_: Any) -> LedgerEntry:
        """Durably append one entry; call only while holding :meth:`lock`.

        Takes every :class:`LedgerEntry` field except ``index``, ``prev_hash`` and
        ``hash`` (``time`` is optional, default now in UTC). Raises LedgerError and
        leaves the ledger as it was if anything cannot be written.
        """
        if not self._held_here():
            raise LedgerError("Ledger.append must be called while holding Ledger.lock()")
        if self.signer is None:
            raise LedgerError("Ledger.append needs the site's signing identity to sign the head")
        unknown = sorted(set(fields_) - set(_CALLER_FIELDS) - {"time"})
        missing = sorted(set(_CALLER_FIELDS) - set(fields_))
        if unknown or missing:
            raise LedgerError(f"ledger entry fields: unknown {unknown or 'none'}, missing {missing or 'none'}")
        data = {name: _coerce(name, fields_[name]) for name in _CALLER_FIELDS}
        data["time"] = _coerce("time", fields_.get("time") or datetime.now(UTC).isoformat(timespec="seconds"))
        chain = self._load()
        data["index"] = len(chain.entries)
        data["prev_hash"] = chain.entries[-1].hash if chain.entries else GENESIS_HASH
        data["hash"] = entry_hash(data)
        line = canonical_json(data) + b"\n"
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot open for writing: {exc}") from exc
        try:
            try:
                os.ftruncate(fd, chain.good_size)
                os.lseek(fd, chain.good_size, os.SEEK_SET)
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
                if created:  # a new file's name must be durable too; an existing one's fsync covers its growth
                    fsync_dir(self.state_dir)
                write_atomic(self.head_path, signed_head(data["index"], data["hash"], self.signer))
            except OSError as exc:
                self._roll_back(fd, chain)
                raise LedgerError(
                    f"{self.path}: could not record the privacy spend ({exc}); nothing was "
                    "recorded and the update must not be sent. Free disk space or fix the "
                    "storage, then retry."
                ) from exc
        finally:
            os.close(fd)
        log.info(
            "privacy ledger: recorded entry %d (dataset %s, run %s, round %d, epsilon %.4f)",
            data["index"],
            data["dataset_id"][:12],
            data["run_id"],
            data["server_round"],
            data["epsilon"],
        )
        return LedgerEntry(**data)

    def _roll_back(self, fd: int, chain: _Chain) -> None:
        """Truncate to the previous size and restore the previous head anchor."""
        try:
            os.ftruncate(fd, chain.good_size)
            os.fsync(fd)
            if chain.head_raw is None:
                self.head_path.unlink(missing_ok=True)
            elif self.head_path.read_bytes() != chain.head_raw:
                write_atomic(self.head_path, chain.head_raw)
        except OSError as exc:
            log.error("%s: rolling back a failed append also failed: %s", self.path, exc)


def entry_to_dict(entry: LedgerEntry) -> dict[str, Any]:
    """A ledger entry as a plain dict (for reports and audits)."""
    return asdict(entry)
