"""The privacy officer's audit: ledger integrity, signed reports, recomputation, budget, reports."""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import pytest

from client.budget import BudgetGuard
from client.private_round import spend_summary
from common.cli import audit as cli_audit
from common.data.site_config import SITE_CONFIG_FILE, SiteConfig
from common.privacy.accounting import Step, compose_epsilon
from common.privacy.audit import AuditInputError, run_audit, write_html, write_markdown, write_plot
from common.privacy.egress import PUBLIC, UPDATE, declaration
from common.privacy.ledger import HEAD_FILE, NON_PRIVATE_DIR, STATE_IN_USE_FILE, TRAIN, Ledger, entry_hash, signed_head
from common.privacy.policy import PrivacyRequest, SitePolicy, write_policy
from common.privacy.report import sign_report
from common.run_record import Reply, RunRecord
from common.security.keys import Identity, write_identity
from common.security.manifest import MANIFEST_FILE, sign_manifest, write_manifest

DATASET = "ab" * 32
RUN_ID = "4242"
BASE = "c0" * 32
Q, STEPS = 0.05, 40
COORDINATOR = Identity.generate("coordinator")
SITES = {name: Identity.generate(name) for name in ("hospital-a", "hospital-b")}
MANIFEST = sign_manifest("test-federation", COORDINATOR, [s.public() for s in SITES.values()])


def _policy(cap: float = 8.0) -> SitePolicy:
    return SitePolicy(max_epsilon=cap, delta=1e-5, accountant="rdp", declared_size=100)


def _site_folder(folder: Path, name: str) -> Path:
    """A site folder as provisioning makes it: site.toml, keys, manifest, state with a policy; returns its state dir."""
    keys = folder / "keys"
    write_identity(SITES[name], keys)
    write_manifest(MANIFEST, keys / MANIFEST_FILE)
    config = SiteConfig(
        site_id=name,
        data_path=folder / "data",
        state_dir=folder / "state",
        keys_dir=keys,
        manifest=keys / MANIFEST_FILE,
        coordinator_fingerprint=COORDINATOR.public().fingerprint(),
    )
    (folder / SITE_CONFIG_FILE).write_text(config.to_toml())
    config.state_dir.mkdir(parents=True)
    write_policy(_policy(), config.policy_path)
    return config.state_dir


@pytest.fixture
def make_site(tmp_path: Path):
    """``tmp_path/<name>``: a site folder whose ledger the real budget guard wrote for 1 or 3 rounds (RDP: fast);
    ``spend``: how many of the planned rounds it trained (all by default)."""

    def make(name: str = "hospital-a", rounds: int = 3, spend: int | None = None) -> Path:
        state = _site_folder(tmp_path / name, name)
        guard = BudgetGuard(state, _policy(), DATASET, SITES[name])
        request = PrivacyRequest(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=rounds)
        plan = guard.plan_run(RUN_ID, request, sample_rate=Q, steps_per_round=STEPS)
        for server_round in range(1, (rounds if spend is None else spend) + 1):
            with guard.spend(plan, TRAIN, server_round) as record:
                record(STEPS, "f" * 64)
        return state

    return make


def failures(report) -> list[str]:
    return [f"{f.where}: {f.message}" for f in report.failures()]


def test_honest_ledger_passes_with_budget_status(tmp_path: Path, make_site) -> None:
    state = make_site()
    report = run_audit([state])
    assert report.passed, failures(report)
    [budget] = report.budgets
    entries = Ledger(state).entries()
    assert (budget.site, budget.rounds, budget.runs, budget.cap) == ("hospital-a", 3, 1, 8.0)
    assert budget.spent_claimed == entries[-1].epsilon
    assert budget.remaining == pytest.approx(8.0 - max(budget.spent_claimed, budget.spent_recomputed))
    assert [r.verdict for r in report.recomputed] == ["ok"] * 3
    # rounds left: exactly that many more rounds at the current noise fit under the cap, one more does not
    history = [e.to_step() for e in entries]
    last = history[-1]

    def after(n: int) -> float:
        return compose_epsilon([*history, Step(last.noise_multiplier, Q, STEPS * n)], 1e-5, "rdp")

    assert budget.rounds_left is not None and budget.rounds_left > 0
    assert after(budget.rounds_left) <= 8.0 < after(budget.rounds_left + 1)


def _rewrite_lines(state: Path, edit) -> None:
    path = state / "privacy-ledger.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def _rechain(state: Path, change, signer: Identity | None) -> None:
    """Rewrite every entry with ``change`` and recompute hashes, chain and head: a consistent forgery.

    The head is signed by ``signer`` (the site's own key: an insider's forgery), or left unsigned.
    """
    previous, rewritten = "0" * 64, []
    for line in (state / "privacy-ledger.jsonl").read_text().splitlines():
        record = json.loads(line)
        change(record)
        record["prev_hash"] = previous
        record["hash"] = previous = entry_hash(record)
        rewritten.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    (state / "privacy-ledger.jsonl").write_text("\n".join(rewritten) + "\n")
    index = len(rewritten) - 1
    head = signed_head(index, previous, signer) if signer else json.dumps({"hash": previous, "index": index}).encode()
    (state / HEAD_FILE).write_bytes(head)


def _edit_noise(lines: list[str]) -> list[str]:
    record = json.loads(lines[1])
    record["noise_multiplier"] *= 2
    return [lines[0], json.dumps(record, sort_keys=True, separators=(",", ":")), lines[2]]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_edit_noise, "entry 1 (line 2): bad hash"),
        (lambda lines: [lines[0], lines[2]], "entry 1 (line 2): holds index 2"),
        (lambda lines: [lines[1], lines[0], lines[2]], "entry 0 (line 1): reordered"),
    ],
    ids=["edited", "deleted", "reordered"],
)
def test_tampered_ledger_fails_naming_the_entry(tmp_path: Path, make_site, edit, expected: str) -> None:
    state = make_site()
    _rewrite_lines(state, edit)
    report = run_audit([state])
    assert not report.passed
    assert any(expected in message and "ledger verification failed" in message for message in failures(report)), (
        failures(report)
    )


def test_deleted_last_entry_is_caught_by_the_head_anchor(tmp_path: Path, make_site) -> None:
    state = make_site()
    _rewrite_lines(state, lambda lines: lines[:2])
    report = run_audit([state])
    assert any("entry 2" in m and "deleted" in m for m in failures(report)), failures(report)


def _append(ledger: Ledger, server_round: int, epsilon: float, sigma: float = 1.0, noise: str = "csprng") -> None:
    with ledger.lock():
        ledger.append(
            dataset_id=DATASET,
            run_id="7",
            server_round=server_round,
            noise_multiplier=sigma,
            sample_rate=Q,
            steps=STEPS,
            max_grad_norm=1.0,
            delta=1e-5,
            epsilon=epsilon,
            accountant="rdp",
            reference_epsilon=-1.0,
            reference_accountant="prv",
            model_fingerprint="f" * 64,
            kind="train",
            noise=noise,
        )


def test_under_reported_epsilon_fails_recomputation(tmp_path: Path) -> None:
    state = _site_folder(tmp_path / "hospital-a", "hospital-a")
    ledger = Ledger(state, signer=SITES["hospital-a"])
    true_first = compose_epsilon([Step(1.0, Q, STEPS)], 1e-5, "rdp")
    true_second = compose_epsilon([Step(1.0, Q, 2 * STEPS)], 1e-5, "rdp")
    _append(ledger, 1, true_first)
    _append(ledger, 2, 0.8 * true_second)  # a valid hash chain around a wrong number
    report = run_audit([state])
    assert [r.verdict for r in report.recomputed] == ["ok", "under-reported"]
    [message] = failures(report)
    assert "ledger entry 1" in message and "under-reports" in message


def test_over_cap_and_non_private_datasets_fail(tmp_path: Path, make_site) -> None:
    state = make_site()
    spent = Ledger(state).entries()[-1].epsilon
    write_policy(_policy(cap=spent / 2), state / "privacy-policy.toml")  # the officer lowered the cap
    (state / NON_PRIVATE_DIR).mkdir()
    (state / NON_PRIVATE_DIR / ("cd" * 32)).write_text("trained without differential privacy\n")
    report = run_audit([state])
    assert {b.dataset_id: b.status for b in report.budgets} == {DATASET: "over-cap", "cd" * 32: "not-private"}
    assert any("over the site's cap" in m for m in failures(report))
    assert any("WITHOUT differential privacy" in m for m in failures(report))


def test_pld_on_an_rdp_ledger_flags_only_a_conservative_gap(tmp_path: Path, make_site) -> None:
    state = make_site(rounds=1)
    report = run_audit([state], method="pld")
    assert report.passed, failures(report)
    assert [r.verdict for r in report.recomputed] == ["over-reported"]
    assert any(f.severity == "warn" and "more conservative" in f.message for f in report.findings)


# coordinator run records ----------------------------------------------------------------


def _run_dir(root: Path, state: Path, site: Identity) -> tuple[Path, RunRecord]:
    """A coordinator run record holding the site's signed train reports of every ledger entry."""
    record = RunRecord(
        run_id=RUN_ID,
        settings={},
        base_model={"fingerprint": BASE},
        transfer_policy="head",
        strategy="fedavg",
        manifest=MANIFEST.to_json(),
    )
    values = {"num-examples": 100, "steps": STEPS}
    for entry in Ledger(state).entries():
        report = {
            "phase": "train",
            "status": "ok",
            "dp": True,
            "dataset-id": entry.dataset_id,
            "epsilon": entry.epsilon,
            "delta": entry.delta,
            "accountant": entry.accountant,
            "reference-epsilon": entry.reference_epsilon,
            "reference-accountant": entry.reference_accountant,
            "cap-epsilon": 8.0,
            "run-target-epsilon": 3.0,
            "overridden": [],
            "noise": entry.noise,
            "declared-size": 100,
            "spends": [spend_summary(entry)],
            "egress": {
                "update": declaration(UPDATE, "DP-SGD"),
                "num-examples": declaration(PUBLIC, "declared size"),
                "steps": declaration(PUBLIC, "planned steps"),
            },
        }
        signed = sign_report(report, RUN_ID, entry.server_round, BASE, site)
        record.site_round(entry.server_round, site.name).train = Reply("ok", "", values, report, signed)
    out = root / "run"
    record.save(out)
    return out, record


def test_run_record_and_ledger_agree(tmp_path: Path, make_site) -> None:
    state = make_site()
    run, _ = _run_dir(tmp_path, state, SITES["hospital-a"])
    report = run_audit([state, run])
    assert report.passed, failures(report)
    assert report.runs == [RUN_ID]
    assert any("3 signed privacy report(s) verify" in f.message for f in report.findings)


def test_forged_or_altered_reports_fail(tmp_path: Path, make_site) -> None:
    state = make_site()
    run, record = _run_dir(tmp_path, state, SITES["hospital-a"])
    record.rounds[0].sites["hospital-a"].train.report["epsilon"] = 0.01  # coordinator edits its plain copy
    second = record.rounds[1].sites["hospital-a"].train
    second.report_signed = sign_report(second.report, RUN_ID, 2, BASE, Identity.generate("hospital-a"))  # unlisted key
    record.save(run)
    messages = failures(run_audit([state, run]))
    assert any("round 1 site hospital-a" in m and "differs from the one the site signed" in m for m in messages)
    assert any("round 2 site hospital-a" in m and "signature does not verify" in m for m in messages)


def test_report_of_a_round_missing_from_the_ledger_fails(tmp_path: Path, make_site) -> None:
    state = make_site()
    run, _ = _run_dir(tmp_path, state, SITES["hospital-a"])
    first = Ledger(state).entries()[0]  # the site restores a backup taken after round 1
    _rewrite_lines(state, lambda lines: lines[:1])
    (state / HEAD_FILE).write_bytes(signed_head(0, first.hash, SITES["hospital-a"]))
    messages = failures(run_audit([state, run]))
    assert any("round 3 site hospital-a" in m and "does not hold" in m for m in messages), messages
    assert not any("round 1 site" in m for m in messages)


def test_reports_alone_are_recomputed(tmp_path: Path, make_site) -> None:
    state = make_site()
    run, _ = _run_dir(tmp_path, state, SITES["hospital-a"])
    report = run_audit([run])
    assert report.passed, failures(report)
    assert [(r.source, r.verdict) for r in report.recomputed] == [("reports", "ok")] * 3
    [budget] = report.budgets
    assert (budget.source, budget.cap, budget.rounds_left) == ("reports", 8.0, None)


def test_unknown_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(AuditInputError, match="neither a site state directory"):
        run_audit([tmp_path])


# outputs --------------------------------------------------------------------------------


def test_report_files_carry_the_per_site_numbers(tmp_path: Path, make_site) -> None:
    make_site("hospital-a", rounds=3)
    make_site("hospital-b", rounds=3, spend=1)  # a run calibrated to the same target, stopped after its first round
    report = run_audit([tmp_path / "hospital-a", tmp_path / "hospital-b" / "state"])
    assert report.passed, failures(report)
    spent = {b.site: f"{b.spent_claimed:.3f}" for b in report.budgets}
    assert spent["hospital-a"] != spent["hospital-b"]
    markdown = write_markdown(report, tmp_path / "audit.md").read_text()
    page = write_html(report, tmp_path / "audit.html").read_text()
    for text in (markdown, page):
        assert "PASSED" in text
        for site, value in spent.items():
            assert site in text and value in text
    plot = write_plot(report, tmp_path / "audit.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtransfer")
    cli_audit.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_json_and_exit_codes(tmp_path: Path, make_site, capsys) -> None:
    state = make_site()
    args = _parser().parse_args(
        ["audit", str(state), "--json", "--report", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")]
    )
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True
    assert data["budgets"][0]["site"] == "hospital-a" and data["budgets"][0]["cap"] == 8.0
    assert (tmp_path / "r.md").is_file() and (tmp_path / "r.png").is_file()
    _rewrite_lines(state, _edit_noise)
    args = _parser().parse_args(["audit", str(state)])
    assert args.func(args) == 1
    assert "entry 1" in capsys.readouterr().out
    args = _parser().parse_args(["audit"])
    assert args.func(args) == 2


# the rewrites an outside audit tried ------------------------------------------------------


def test_a_consistent_rewrite_of_the_whole_ledger_fails_without_the_sites_key(tmp_path: Path, make_site) -> None:
    state = make_site()

    def fewer_steps(record):
        record["steps"] = 2

    _rechain(state, fewer_steps, signer=None)
    assert any("not signed" in m for m in failures(run_audit([state])))
    _rechain(state, fewer_steps, signer=Identity.generate("hospital-a"))
    assert any("signature does not verify" in m for m in failures(run_audit([state])))


def test_every_epsilon_lowered_by_two_and_a_half_percent_fails_even_when_the_site_signs_it(
    tmp_path: Path, make_site
) -> None:
    state = make_site()

    def lower(record):
        record["epsilon"] *= 0.975

    _rechain(state, lower, signer=SITES["hospital-a"])  # an insider who holds the site's key
    report = run_audit([state])
    assert [r.verdict for r in report.recomputed] == ["under-reported"] * 3, failures(report)


def test_a_dropped_tail_with_a_rewritten_head_and_a_wiped_ledger_fail(tmp_path: Path, make_site) -> None:
    state = make_site()
    first = Ledger(state).entries()[0]
    _rewrite_lines(state, lambda lines: lines[:1])
    (state / HEAD_FILE).write_text(json.dumps({"hash": first.hash, "index": 0}) + "\n")
    assert any("not signed" in m for m in failures(run_audit([state])))
    (state / "privacy-ledger.jsonl").unlink()
    (state / HEAD_FILE).unlink()
    (state / STATE_IN_USE_FILE).write_bytes(b"k" * 32)  # the site's dataset-identity key: the state was in use
    assert any("deleted" in m for m in failures(run_audit([state])))


def test_a_state_directory_without_the_sites_key_cannot_pass(tmp_path: Path, make_site) -> None:
    state = make_site()
    (tmp_path / "hospital-a" / SITE_CONFIG_FILE).unlink()
    assert any("no site key found" in m for m in failures(run_audit([state])))


def test_reproducible_noise_is_flagged_as_not_private(tmp_path: Path) -> None:
    state = _site_folder(tmp_path / "hospital-a", "hospital-a")
    ledger = Ledger(state, signer=SITES["hospital-a"])
    _append(ledger, 1, compose_epsilon([Step(1.0, Q, STEPS)], 1e-5, "rdp"), noise="seeded")
    report = run_audit([state])
    assert [b.status for b in report.budgets] == ["not-private"]
    assert any("reproducible" in m and "NOT private" in m for m in failures(report))


# what a privacy officer reads -----------------------------------------------------------


def test_a_run_is_authenticated_by_the_sites_coordinator_fingerprint_or_warned_about_once(
    tmp_path: Path, make_site, caplog
) -> None:
    state = make_site()
    run, _ = _run_dir(tmp_path, state, SITES["hospital-a"])
    with caplog.at_level("WARNING"):
        alone = run_audit([run])
    warnings = [f.message for f in alone.findings if f.severity == "warn"]
    assert len(warnings) == 1 and "--coordinator-fingerprint" in warnings[0] and "--sim-root" in warnings[0]
    assert not [r for r in caplog.records if "manifest" in r.getMessage()]  # said once, by the audit
    with_site = run_audit([state, run])
    assert not [f for f in with_site.findings if f.severity == "warn"]
    assert any("site hospital-a's site.toml names" in f.message for f in with_site.findings)


def test_the_dataset_a_site_holds_is_named_by_its_data_path(tmp_path: Path, make_site) -> None:
    from common.data.site_data import dataset_fingerprint
    from common.privacy.dataset_id import dataset_key, keyed_id

    state = make_site()  # trained on an older copy of the data: only its identity is known
    data = tmp_path / "hospital-a" / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.csv").write_text("age,label\n50,1\n61,0\n")
    current = keyed_id(dataset_key(state), dataset_fingerprint(data))
    guard = BudgetGuard(state, _policy(), current, SITES["hospital-a"])
    plan = guard.plan_run("4243", PrivacyRequest(3.0, 1e-5, 1.0, 1), sample_rate=Q, steps_per_round=STEPS)
    with guard.spend(plan, TRAIN, 1) as record:
        record(STEPS, "f" * 64)
    report = run_audit([state])
    assert report.passed, failures(report)
    assert sorted(b.dataset for b in report.budgets) == sorted(["hospital-a/data", DATASET[:12]])
    assert "hospital-a/data" in write_markdown(report, tmp_path / "audit.md").read_text()


def test_reports_say_delta_everywhere_and_what_the_figures_mean(tmp_path: Path, make_site) -> None:
    from common.privacy.audit import BUDGET_HEADER, EMPIRICAL_HEADER, SUMMARY_HEADER, explanation
    from common.privacy.audit.render import RECOMPUTED_HEADER

    report = run_audit([make_site()])
    assert all("delta" in header for header in (BUDGET_HEADER, SUMMARY_HEADER, RECOMPUTED_HEADER, EMPIRICAL_HEADER))
    [budget] = report.budgets
    epsilon = max(budget.spent_claimed, budget.spent_recomputed)
    meaning = explanation(report)
    assert f"epsilon {epsilon:.2f} at delta 1e-05" in meaning and "1 in 100,000" in meaning
    markdown = write_markdown(report, tmp_path / "audit.md").read_text()
    assert meaning in markdown and markdown.count("| 1e-05 |") == 1 + len(report.recomputed)
    page = write_html(report, tmp_path / "audit.html").read_text()
    assert html.escape(meaning) in page and page.count("<td>1e-05</td>") == 1 + len(report.recomputed)


def test_the_plot_is_written_where_the_cli_says(tmp_path: Path, make_site, capsys) -> None:
    state = make_site()
    args = _parser().parse_args(["audit", str(state), "--plot", str(tmp_path / "audit-hd")])
    assert args.func(args) == 0
    assert f"Wrote {tmp_path / 'audit-hd.png'}" in capsys.readouterr().err
    assert (tmp_path / "audit-hd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_json_is_the_only_thing_on_standard_output(tmp_path: Path, make_site) -> None:
    """A real ``fedtransfer audit --json`` process: ``json.loads`` of its standard output, warnings elsewhere."""
    import subprocess
    import sys

    state = make_site()
    run, _ = _run_dir(tmp_path, state, SITES["hospital-a"])
    done = subprocess.run(
        [str(Path(sys.executable).with_name("fedtransfer")), "audit", str(run), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["passed"] is True and data["runs"] == [str(RUN_ID)]
    assert any(f["severity"] == "warn" for f in data["findings"])  # the manifest warning is in the JSON, not before it
