"""Bad input and broken storage: each gives its own error, and nothing is lost.

At the coordinator, a corrupted, truncated or mismatched checkpoint stops the run before
anything is written. At a site during a federated (DP) round, bad data, an invalid policy,
a ledger locked by another process, a full disk and a base model that does not match its
card each make that site's reply an error naming the kind of problem, while the details
(which may quote the site's records) stay in the site's own log; the round goes on with
the other sites and the site's ledger is left exactly as it was. A site process killed by
SIGTERM while training leaves a ledger that verifies and holds the round or not, never
half of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, RecordDict

from client.app import app as client_app
from common.data.site_config import site_dir
from common.model.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    ArchitectureMismatch,
    CardInvalid,
    CheckpointError,
    CorruptWeights,
    WeightsHashMismatch,
    load_checkpoint,
)
from common.privacy.ledger import LEDGER_FILE, LOCK_FILE, Ledger
from common.protocol import BASE_MODEL
from common.run_record import RUN_RECORD_FILE, RunRecord
from common.settings import RunSettings
from server.federation import SOURCE_MODEL_DIR
from simulations.inprocess import DirectGrid, run_on_grid
from tests.conftest import write_shifted_study
from tests.test_faults import (
    FIRST_NODE,
    instruction_to,
    ledger_files,
    ledger_rounds,
    node_of,
    private_settings,
    site_ledger,
    train_round_of,
    write_rdp_policies,
)

REPO = Path(__file__).resolve().parents[1]


# the coordinator's checkpoint ---------------------------------------------------------------


def _flip_a_byte(checkpoint: Path) -> None:
    weights = bytearray((checkpoint / WEIGHTS_FILE).read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (checkpoint / WEIGHTS_FILE).write_bytes(bytes(weights))


def _truncate(checkpoint: Path) -> None:
    weights = (checkpoint / WEIGHTS_FILE).read_bytes()
    (checkpoint / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])


def _truncate_and_rehash(checkpoint: Path) -> None:
    """A truncated file whose card was regenerated for it: the hash matches, the content is unreadable."""
    _truncate(checkpoint)
    card = json.loads((checkpoint / CARD_FILE).read_text())
    card["weights_sha256"] = hashlib.sha256((checkpoint / WEIGHTS_FILE).read_bytes()).hexdigest()
    (checkpoint / CARD_FILE).write_text(json.dumps(card))


def _truncate_card(checkpoint: Path) -> None:
    card = (checkpoint / CARD_FILE).read_text()
    (checkpoint / CARD_FILE).write_text(card[: len(card) // 2])


def _card_of_another_architecture(checkpoint: Path) -> None:
    """The card describes a wider network than the weights hold (its hash still matches the file)."""
    card = json.loads((checkpoint / CARD_FILE).read_text())
    card["arch_args"]["hidden"] = [64, 16]
    (checkpoint / CARD_FILE).write_text(json.dumps(card))


CHECKPOINT_DAMAGE: dict[str, tuple[Callable[[Path], None], type[CheckpointError], str]] = {
    "flipped-byte": (_flip_a_byte, WeightsHashMismatch, "the weights were changed or belong to another card"),
    "truncated-weights": (_truncate, WeightsHashMismatch, "the weights were changed or belong to another card"),
    "truncated-rehashed": (_truncate_and_rehash, CorruptWeights, "is not a readable safetensors file"),
    "truncated-card": (_truncate_card, CardInvalid, "is not valid JSON"),
    "card-of-other-weights": (_card_of_another_architecture, ArchitectureMismatch, "the architecture needs"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A study and the source checkpoint a one-round run pretrained for it."""
    root = tmp_path_factory.mktemp("checkpoint")
    study = write_shifted_study(root / "study", sites=2)
    grid = DirectGrid(client_app, num_nodes=2)
    settings = RunSettings(
        scenario=str(study),
        rounds=1,
        local_epochs=1,
        dp=False,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=2,
        expected_sites=2,
    )
    run_on_grid(grid, settings)
    return study, root / "out" / SOURCE_MODEL_DIR


@pytest.mark.federation
@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_stops_the_run_with_its_error_and_loses_nothing(
    tmp_path: Path, pristine, damage: str
) -> None:
    study, source = pristine
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(source, checkpoint)
    mutate, error, message = CHECKPOINT_DAMAGE[damage]
    mutate(checkpoint)
    damaged = {name: (checkpoint / name).read_bytes() for name in (WEIGHTS_FILE, CARD_FILE)}
    out = tmp_path / "out"
    out.mkdir()
    earlier = b'{"note": "the record of an earlier run in this directory"}'
    (out / RUN_RECORD_FILE).write_bytes(earlier)
    settings = RunSettings(
        scenario=str(study),
        checkpoint=str(checkpoint),
        rounds=1,
        dp=False,
        out=str(out),
        sim_root=str(tmp_path / "sites"),
        min_sites=2,
    )
    grid = DirectGrid(client_app, num_nodes=2)
    with pytest.raises(error, match=message) as raised:
        run_on_grid(grid, settings)
    assert str(checkpoint) in str(raised.value)
    assert grid.delivered == []  # no site was contacted
    assert {name: (checkpoint / name).read_bytes() for name in damaged} == damaged  # left as found, for inspection
    assert (
        sorted(p.name for p in out.iterdir()) == [RUN_RECORD_FILE] and (out / RUN_RECORD_FILE).read_bytes() == earlier
    )
    load_checkpoint(source)  # the source it was copied from is still good


# bad input at sites during a private round ------------------------------------------------------

SITES = 9
HONEST = ["site-7", "site-8"]
BAD_ROUND = 2
CARD_VICTIM = 6  # gets a base model that does not match its card on first contact (round 1)
LOCK_WAIT = 1.0  # seconds a site waits for its ledger lock in this test (the library's default is 30)


def _data(sim_root: Path, site: int) -> Path:
    return site_dir(sim_root, f"site-{site}") / "data"


def _wrong_columns(data: Path) -> None:
    with np.load(data / "train.npz") as arrays:
        x, y = arrays["x"], arrays["y"]
    (data / "train.npz").unlink()
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["outcome"])
    rows = [",".join(f"{v:.5f}" for v in row) + f",{label}" for row, label in zip(x, y)]
    (data / "train.csv").write_text(header + "\n" + "\n".join(rows) + "\n")


def _rewrite(data: Path, name: str, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    with np.load(data / name) as arrays:
        x, y = change(arrays["x"].copy(), arrays["y"].copy())
    np.savez(data / name, x=x, y=y)


def _nan_cell(data: Path) -> None:
    def change(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x[3, 2] = np.nan
        return x, y

    _rewrite(data, "train.npz", change)


def _one_class(data: Path) -> None:
    for name in ("train.npz", "test.npz"):
        _rewrite(data, name, lambda x, y: (x, np.zeros_like(y)))


def _zero_rows(data: Path) -> None:
    _rewrite(data, "train.npz", lambda x, y: (x[:0], y[:0]))


DATA_FAULTS: dict[int, tuple[Callable[[Path], None], str]] = {
    2: (_wrong_columns, "MissingLabelColumn: {data}/train.csv: no label column 'label'"),
    3: (_nan_cell, "MissingValues: {data}/train.npz: 1 missing value (empty, NA or NaN): row 3 feature (2,)"),
    4: (
        _one_class,
        "SingleClass: {data}/train.npz: every training row has label 0; training needs at least two classes",
    ),
    5: (_zero_rows, "TooFewRows: {data}/train.npz: the train split has 0 rows"),
}
POLICY_VICTIM, LOCK_VICTIM, DISK_VICTIM = 6, 1, 0
INVALID_POLICY = '[privacy]\nmax_epsilon = "as much as needed"\ndelta = 1e-5\n'


class LockHolder:
    """Another process holding a site's ledger lock (as a stuck earlier site process would)."""

    def __init__(self, lock_file: Path) -> None:
        script = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0); os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, str(lock_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0


class FullDisk:
    """``os.write`` on one ledger file writes half its bytes, then fails with ENOSPC, while armed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.target: str | None = None
        self.partial_writes = 0
        real_write = os.write

        def write(fd: int, data: bytes) -> int:
            if self.target is None or os.readlink(f"/proc/self/fd/{fd}") != self.target:
                return real_write(fd, data)
            if self.partial_writes == 0:
                self.partial_writes += 1
                return real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", write)


class SiteLog(logging.Handler):
    """What the sites wrote to their own log (in this test all sites share the process)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def bad_input_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad-input")
    site_log = SiteLog()
    logging.getLogger("client").addHandler(site_log)
    sim_root = root / "sites"
    study = write_shifted_study(root / "study", sites=SITES)
    write_rdp_policies(sim_root, SITES)
    grid = DirectGrid(client_app, num_nodes=SITES)
    saved: dict[int, dict[str, bytes]] = {}
    before: dict[int, tuple[bytes | None, bytes | None]] = {}
    holder: dict[str, LockHolder] = {}

    with pytest.MonkeyPatch.context() as patch:
        disk = FullDisk(patch)
        real_lock = Ledger.lock
        patch.setattr(Ledger, "lock", lambda self, timeout=LOCK_WAIT: real_lock(self, min(timeout, LOCK_WAIT)))

        def on_instruction(node: int, msg: Message) -> Message:
            site, server_round = node - FIRST_NODE, train_round_of(msg)
            if server_round == 1 and site == CARD_VICTIM:
                base = msg.content[BASE_MODEL].to_torch_state_dict()
                first = next(iter(base))
                base[first] = base[first] + 0.5
                content = RecordDict({**dict(msg.content.items()), BASE_MODEL: ArrayRecord(base)})
                return Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node)
            if server_round != BAD_ROUND or site >= 7:
                return msg
            before[site] = ledger_files(sim_root, site)
            if site in DATA_FAULTS:
                data = _data(sim_root, site)
                saved[site] = {p.name: p.read_bytes() for p in data.iterdir()}
                DATA_FAULTS[site][0](data)
            elif site == POLICY_VICTIM:
                policy = site_dir(sim_root, f"site-{site}") / "state" / "privacy-policy.toml"
                saved[site] = {policy.name: policy.read_bytes()}
                policy.write_text(INVALID_POLICY)
            elif site == LOCK_VICTIM:
                holder["process"] = LockHolder(site_dir(sim_root, f"site-{site}") / "state" / LOCK_FILE)
            elif site == DISK_VICTIM:
                disk.target = str((site_dir(sim_root, f"site-{site}") / "state" / LEDGER_FILE).resolve())
            return msg

        def on_reply(node: int, reply: Message) -> Message:
            site = node - FIRST_NODE
            if train_round_of(instruction_to(grid, node)) != BAD_ROUND:
                return reply
            if site in DATA_FAULTS:
                data = _data(sim_root, site)
                for path in data.iterdir():
                    path.unlink()
                for name, content in saved[site].items():
                    (data / name).write_bytes(content)
            elif site == POLICY_VICTIM:
                (site_dir(sim_root, f"site-{site}") / "state" / "privacy-policy.toml").write_bytes(
                    saved[site]["privacy-policy.toml"]
                )
            elif site == LOCK_VICTIM:
                holder["pid"] = holder["process"].process.pid
                holder.pop("process").release()
            elif site == DISK_VICTIM:
                disk.target = None
            return reply

        grid.on_instruction, grid.on_reply = on_instruction, on_reply
        try:
            record = run_on_grid(grid, private_settings(study, root, rounds=BAD_ROUND, sites=SITES, min_sites=2))
        finally:
            logging.getLogger("client").removeHandler(site_log)
    return sim_root, record, before, holder["pid"], disk.partial_writes, "\n".join(site_log.lines)


def _victim(record: RunRecord, site: int, kind: str) -> str:
    """The site's failure as the coordinator recorded it: the kind of problem only, never its details."""
    current = record.round(BAD_ROUND)
    assert current.aggregated_sites == HONEST
    assert all(current.sites[name].status == "ok" for name in HONEST)
    result = current.sites[f"site-{site}"]
    assert result.status == "failed", result
    assert f"could not complete this instruction ({kind}); the details are in the site's own log" in result.reason
    return result.reason


@pytest.mark.federation
@pytest.mark.parametrize("site", list(DATA_FAULTS))
def test_bad_data_at_a_site_fails_its_reply_with_the_problem_and_the_round_goes_on(bad_input_run, site: int) -> None:
    sim_root, record, before, _, _, site_log = bad_input_run
    kind, detail = DATA_FAULTS[site][1].format(data=_data(sim_root, site).resolve()).split(": ", 1)
    reason = _victim(record, site, kind)
    assert detail in site_log and str(_data(sim_root, site)) not in reason  # paths and values stay at the site
    assert ledger_files(sim_root, site) == before[site]
    assert ledger_rounds(sim_root, site) == [1]


@pytest.mark.federation
def test_invalid_policy_at_a_site_fails_its_reply_and_the_round_goes_on(bad_input_run) -> None:
    sim_root, record, before, _, _, site_log = bad_input_run
    reason = _victim(record, POLICY_VICTIM, "PolicyError")
    assert "max_epsilon must be a number" in site_log and "'as much as needed'" in site_log
    assert "as much as needed" not in reason
    assert ledger_files(sim_root, POLICY_VICTIM)[0] == before[POLICY_VICTIM][0] is None  # nothing was spent


@pytest.mark.federation
def test_ledger_locked_by_another_process_fails_the_reply_and_leaves_the_ledger(bad_input_run) -> None:
    sim_root, record, before, holder_pid, _, site_log = bad_input_run
    _victim(record, LOCK_VICTIM, "LedgerLocked")
    assert f"another process (pid {holder_pid}) holds the privacy ledger lock" in site_log
    assert ledger_files(sim_root, LOCK_VICTIM) == before[LOCK_VICTIM]
    assert ledger_rounds(sim_root, LOCK_VICTIM) == [1]


@pytest.mark.federation
def test_full_disk_while_recording_sends_no_update_and_leaves_the_ledger(bad_input_run) -> None:
    sim_root, record, before, _, partial_writes, site_log = bad_input_run
    assert partial_writes == 1  # the fault really hit the append, halfway through its line
    _victim(record, DISK_VICTIM, "LedgerError")
    assert "No space left on device" in site_log and "the update must not be sent" in site_log
    assert ledger_files(sim_root, DISK_VICTIM) == before[DISK_VICTIM]
    assert ledger_rounds(sim_root, DISK_VICTIM) == [1]
    assert site_ledger(sim_root, DISK_VICTIM).verify() == 1


@pytest.mark.federation
def test_base_model_not_matching_its_card_is_refused_at_the_site(bad_input_run) -> None:
    sim_root, record, _, _, _, site_log = bad_input_run
    first = record.round(1)
    # first contact: the failure is filed under the node id until the site's evaluation reply proves who it is
    refused = first.sites.get(f"site-{CARD_VICTIM}") or first.sites[f"node-{node_of(CARD_VICTIM)}"]
    assert refused.status == "failed" and "(BaseModelMismatch)" in refused.reason
    assert "the base model received has fingerprint" in site_log
    assert f"site-{CARD_VICTIM}" not in first.aggregated_sites and len(first.aggregated_sites) == SITES - 1
    assert ledger_files(sim_root, CARD_VICTIM)[0] is None  # nothing spent (a new state gets its signed genesis head)


@pytest.mark.federation
def test_every_ledger_verifies_after_the_bad_round(bad_input_run) -> None:
    sim_root, record, _, _, _, _ = bad_input_run
    assert record.status == "completed"
    for site in range(SITES):
        ledger = site_ledger(sim_root, site)
        assert ledger.verify() == len(ledger.entries())
    assert ledger_rounds(sim_root, 7) == ledger_rounds(sim_root, 8) == [1, 2]


# SIGTERM at a deployed-style site process ---------------------------------------------------

SITE_PROCESS = """
import signal, sys
from pathlib import Path
import torch
from client.budget import BudgetGuard
from client.dp_training import dp_train, sample_rate_and_steps
from common.model.training import TrainConfig, use_one_torch_thread
from common.privacy.ledger import TRAIN
from common.privacy.noise import SecureRandom
from common.privacy.policy import PrivacyRequest, SitePolicy
from common.security.keys import Identity

state, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "graceful":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
use_one_torch_thread()
generator = torch.Generator().manual_seed(0)
x = torch.randn(4000, 8, generator=generator)
y = (x[:, 0] > 0).long()
model = torch.nn.Linear(8, 2)
config = TrainConfig(epochs=1, batch_size=16, lr=0.05)
rate, steps = sample_rate_and_steps(len(y), config.batch_size, config.epochs)
policy = SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", declared_size=len(y))
guard = BudgetGuard(state, policy, "d" * 64, Identity.generate("site-under-test"))
plan = guard.plan_run("run-1", PrivacyRequest(3.0, 1e-5, 1.0, 20), rate, steps)
for server_round in (1, 2):
    with guard.spend(plan, TRAIN, server_round) as record:
        print(f"training {server_round}", flush=True)
        while True:  # round 2 trains until the test's SIGTERM, however late the test reads this line
            stats = dp_train(model, x, y, config, noise_multiplier=plan.noise_multiplier, max_grad_norm=1.0,
                             sample_rate=rate, steps=steps, expected_batch_size=rate * len(y), source=SecureRandom())
            if server_round == 1:
                break
        record(stats.steps, f"round-{server_round}")
    print(f"recorded {server_round}", flush=True)
"""


EXIT_CODES = {"default": -signal.SIGTERM, "graceful": 143}  # killed outright; or a handler exits, unwinding the lock


@pytest.mark.slow
def test_sigterm_during_training_leaves_a_whole_ledger(tmp_path: Path) -> None:
    sites = {}
    for mode in EXIT_CODES:  # both site processes run at once: most of their time is importing torch
        (tmp_path / mode).mkdir()
        with (tmp_path / mode / "stderr.txt").open("w") as errors:
            sites[mode] = subprocess.Popen(
                [sys.executable, "-c", SITE_PROCESS, str(tmp_path / mode / "state"), mode],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
    for mode, site in sites.items():
        lines = []
        while (line := site.stdout.readline()) and line.strip() != "training 2":
            lines.append(line.strip())
        assert lines == ["training 1", "recorded 1"], (tmp_path / mode / "stderr.txt").read_text()
        site.send_signal(signal.SIGTERM)
    for mode, site in sites.items():
        assert site.wait(timeout=60) == EXIT_CODES[mode]
        state = tmp_path / mode / "state"
        ledger = Ledger(state)
        rounds = [entry.server_round for entry in ledger.entries()]
        assert rounds == [1], mode  # the round the signal interrupted is not recorded, not even in part
        assert ledger.verify() == len(rounds)
        assert (state / LEDGER_FILE).read_bytes().endswith(b"\n")
        with ledger.lock(timeout=1.0):  # the dead process's lock went with it
            pass
