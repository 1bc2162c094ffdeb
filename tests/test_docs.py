"""Every shell command the docs show runs as written, and every figure they quote matches a fresh run.

Conventions in README.md and docs/*.md: an HTML comment (invisible once rendered) on the line
before a fenced block, or inside a paragraph:

- ``<!-- run: ID -->`` before a ``bash`` block: :data:`RUNS` prepares a temporary folder for ID and
  runs the block there as written, with bash (``set -e``), this installation's ``.venv/bin`` first on
  PATH (as after ``. .venv/bin/activate``) and, where the block says ``./setup.sh`` or ``.venv/bin``,
  a checkout's files beside it. Blocks that run longer than a few seconds are in the slow tier.
- ``<!-- not run: REASON -->`` before a block that cannot run here, and why (a deployment across
  machines, say, which ``tests/test_deployment.py`` exercises on loopback instead).
- ``<!-- figures: ID -->`` before an output block, or inside the paragraph that quotes figures:
  :data:`FIGURES` checks them against a fresh run of the command named there (the ``run: ID`` block
  of the same ID where there is one), within the spread of the sites' DP noise where that noise
  makes them vary.

Every ``bash``/``sh``/``shell``/``console`` block carries ``run`` or ``not run``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
SHELL = ("bash", "sh", "shell", "console", "zsh")
MARKER = re.compile(r"<!--\s*(run|not run|figures):\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)")

#: The methods of ``fedtransfer simulate``'s comparison table, and how far a quoted accuracy may lie from a fresh
#: run's: the baselines train without DP from the seed; the federated row carries the sites' DP noise.
METHODS = ("source as-is", "local-only", "local-only (DP)", "federated", "personalised", "pooled")
#: Rows and per-site columns trained with DP noise: they differ between runs by the noise.
NOISY = ("local-only (DP)", "local DP", "federated", "personalised")
BASELINE_TOLERANCE, NOISY_SITE_TOLERANCE, NOISY_MEAN_TOLERANCE = 0.04, 0.15, 0.08
#: A DP row's threshold metrics (balanced accuracy, F1, sensitivity, specificity, accuracy) move more with the
#: noise than its AUC: one test row crossing the threshold moves a site's sensitivity by 1/positives.
NOISY_THRESHOLD_TOLERANCE = 0.2


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    text: str
    marker: tuple[str, str] | None

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file with the marker on the line before each (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.group(1), opening.group(2)
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.search(before)
        body = "\n".join(line.removeprefix(indent) for line in lines[index + 1 : end])
        found.append(Block(path, index + 1, language, body, (marker.group(1), marker.group(2)) if marker else None))
        index = end + 1
    return found


def markers(kind: str) -> dict[str, Path]:
    """Every ``<!-- KIND: ID -->`` in the docs: ID -> the file holding it."""
    return {m.group(2): path for path in DOCS for m in MARKER.finditer(path.read_text()) if m.group(1) == kind}


def run_block(name: str) -> Block:
    [block] = [b for path in DOCS for b in blocks(path) if b.marker == ("run", name)]
    return block


def quoted(name: str) -> str:
    """What a ``figures: ID`` marker quotes: the block after it, else the paragraph that holds it."""
    path = markers("figures")[name]
    after = [b for b in blocks(path) if b.marker == ("figures", name)]
    if after:
        return after[0].text
    paragraph = next(p for p in re.split(r"\n\s*\n", path.read_text()) if f"figures: {name}" in p)
    return paragraph


def execute(block: Block, folder: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``block`` as written in ``folder``, as a user of this checkout would."""
    env = os.environ | {"PATH": os.pathsep.join([str(VENV_BIN), os.environ["PATH"]]), "COLUMNS": "120"}
    done = subprocess.run(
        ["bash", "-e", "-c", block.text], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def checkout_beside(folder: Path) -> Path:
    """``folder`` as a clone's root for commands that say ``./setup.sh`` or ``.venv/bin/...``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("setup.sh", "pyproject.toml", ".venv"):
        (folder / name).symlink_to(REPO / name)
    return folder


# every command block runs or says why ---------------------------------------------------------


def test_every_command_block_is_run_or_says_why() -> None:
    unmarked, reasonless, unknown = [], [], []
    for path in DOCS:
        for block in blocks(path):
            if block.language not in SHELL:
                continue
            if block.marker is None or block.marker[0] == "figures":
                unmarked.append(str(block))
            elif block.marker[0] == "not run" and len(block.marker[1]) < 10:
                reasonless.append(str(block))
            elif block.marker[0] == "run" and block.marker[1] not in RUNS:
                unknown.append(f"{block}: {block.marker[1]}")
    assert not unmarked, f"command blocks without <!-- run: ID --> or <!-- not run: REASON -->: {unmarked}"
    assert not reasonless, f"<!-- not run --> without a reason: {reasonless}"
    assert not unknown, f"<!-- run: ID --> that no test runs: {unknown}"


def test_every_run_and_figure_marker_has_its_check_and_back() -> None:
    assert sorted(markers("run")) == sorted(RUNS)
    assert sorted(markers("figures")) == sorted(FIGURES)


# tables in fedtransfer simulate's output ------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"[│┃|]|\s{2,}", line.strip()) if c.strip()]


def _number(cell: str) -> float:
    return math.nan if cell == "n/a" else float(cell)


def summary_rows(text: str) -> dict[str, tuple[str, list[float]]]:
    """{method: (privacy, [AUC, balanced accuracy, F1, sensitivity, specificity, accuracy])}, means over sites."""
    rows = {}
    for line in text.splitlines():
        cells = _cells(line)
        if len(cells) > 2 and cells[0] in METHODS:
            rows[cells[0]] = (cells[1], [_number(c) for c in cells[2:]])
    return rows


def site_rows(text: str) -> tuple[list[str], dict[str, list[float]]]:
    """The per-site headline table: its method columns and {site: [test rows, one value per method]}."""
    lines = [_cells(line) for line in text.splitlines()]
    start = next(i for i, cells in enumerate(lines) if cells[:2] == ["site", "n"])
    columns, rows = lines[start][2:], {}
    for cells in lines[start + 1 :]:
        if len(cells) == len(columns) + 2 and cells[1].isdigit():
            rows[cells[0]] = [_number(c) for c in cells[1:]]
        elif rows:
            break
    return columns, rows


def privacy_rows(text: str) -> dict[str, tuple[float, str, str, str]]:
    """{site: (epsilon, cap, delta, accountant)} from the privacy table."""
    rows = {}
    for line in text.splitlines():
        cells = _cells(line)
        if len(cells) >= 5 and cells[4] in ("pld", "prv", "rdp") and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = (float(cells[1]), cells[2], cells[3], cells[4])
    return rows


def check_simulate_output(quote: str, output: str) -> None:
    expected, fresh = summary_rows(quote), summary_rows(output)
    assert list(expected) == list(fresh), f"methods quoted {list(expected)}, printed {list(fresh)}"
    for method, (privacy, values) in expected.items():
        assert fresh[method][0] == privacy, (method, fresh[method][0])
        for index, (want, got) in enumerate(zip(values, fresh[method][1], strict=True)):
            noisy = NOISY_MEAN_TOLERANCE if index == 0 else NOISY_THRESHOLD_TOLERANCE  # column 0: AUC
            tolerance = noisy if method in NOISY else BASELINE_TOLERANCE
            assert abs(want - got) <= tolerance, f"{method} column {index}: quoted {want}, printed {got}"
    (columns, quoted_sites), (printed_columns, printed_sites) = site_rows(quote), site_rows(output)
    assert columns == printed_columns and list(quoted_sites) == list(printed_sites)
    for site, (size, *values) in quoted_sites.items():
        assert printed_sites[site][0] == size, (site, printed_sites[site])
        for column, want, got in zip(columns, values, printed_sites[site][1:], strict=True):
            tolerance = NOISY_SITE_TOLERANCE if column in NOISY else BASELINE_TOLERANCE
            assert abs(want - got) <= tolerance, f"{site} {column}: quoted {want}, printed {got}"
    printed = privacy_rows(output)
    for site, (epsilon, cap, delta, accountant) in privacy_rows(quote).items():
        assert printed[site][1:] == (cap, delta, accountant), (site, printed[site])
        assert abs(printed[site][0] - epsilon) <= 0.01, (site, printed[site])


# runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = checkout_beside(tmp_path_factory.mktemp("quick-start"))
    return folder, execute(run_block("quick-start"), folder, timeout=1800).stdout


@pytest.fixture(scope="module")
def imaging(tmp_path_factory: pytest.TempPathFactory) -> str:
    return execute(run_block("imaging"), tmp_path_factory.mktemp("imaging"), timeout=3600).stdout


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The provision blocks' folder, holding the enrolments that step 1 has each hospital send."""
    folder = tmp_path_factory.mktemp("provision")
    for site in ("hospital-a", "hospital-b", "hospital-c", "hospital-d"):
        site_folder = folder / "at-the-sites" / site
        enrol = [str(VENV_BIN / "fedtransfer"), "keys", "site", "--site-id", site, "--out", str(site_folder)]
        subprocess.run([*enrol, "--declared-size", "500"], check=True, capture_output=True, timeout=120)
        (folder / f"{site}.enrolment.json").write_bytes((site_folder / f"{site}.enrolment.json").read_bytes())
    execute(run_block("provision"), folder, timeout=300)
    return folder


@pytest.mark.slow
def test_quick_start(quick_start: tuple[Path, str]) -> None:
    folder, output = quick_start
    assert len(list((folder / "fedtransfer-runs").glob("*/run-record.json"))) == 1


@pytest.mark.slow
def test_audit_after_the_quick_start(quick_start: tuple[Path, str]) -> None:
    done = execute(run_block("audit"), quick_start[0], timeout=900)
    assert done.stdout.count("AUDIT PASSED") == 2


@pytest.mark.slow
def test_app_run(tmp_path: Path) -> None:
    done = execute(run_block("app-run"), checkout_beside(tmp_path), timeout=1800)
    assert "finished:completed" in done.stdout


@pytest.mark.slow
def test_imaging(imaging: str) -> None:
    assert summary_rows(imaging)


def test_provision(kits: Path) -> None:
    assert (kits / "kits" / "coordinator" / "run.sh").is_file()


def test_provision_adds_a_site(kits: Path) -> None:
    execute(run_block("provision-add"), kits, timeout=300)
    assert (kits / "kits" / "sites" / "hospital-d" / "site.toml").is_file()


RUNS: dict[str, Callable] = {
    "quick-start": test_quick_start,
    "audit": test_audit_after_the_quick_start,
    "app-run": test_app_run,
    "imaging": test_imaging,
    "provision": test_provision,
    "provision-add": test_provision_adds_a_site,
}


# figures -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_quick_start_figures(quick_start: tuple[Path, str]) -> None:
    check_simulate_output(quoted("quick-start"), quick_start[1])


@pytest.mark.slow
def test_the_imaging_figures(imaging: str) -> None:
    check_simulate_output(quoted("imaging"), imaging)


@pytest.mark.slow
def test_the_release_share_figures(quick_start: tuple[Path, str]) -> None:
    from common.privacy.accounting import calibrate_noise

    text = " ".join(quoted("release-share").split())
    found = re.search(r"goes from ([\d.]+) to ([\d.]+) and .* standard deviation ([\d.]+)", text)
    alone, with_release, release = (float(v) for v in found.groups())
    [plan] = quick_start[0].glob("fedtransfer-runs/*/sites/hospital-a/state/plans/*.json")
    plan = json.loads(plan.read_text())
    steps = plan["settings"]["planned_rounds"] * plan["steps_per_round"]
    assert round(plan["noise_multiplier"], 2) == with_release
    assert round(plan["release_noise_multiplier"], 2) == release
    assert round(calibrate_noise([], plan["sample_rate"], steps, 3.0, 1e-5, "pld"), 2) == alone


@pytest.mark.slow
def test_the_empirical_audit_figures(tmp_path: Path) -> None:
    text = " ".join(quoted("empirical-audit").split())
    honest = re.search(r"accounted epsilon ([\d.]+), lower bound ([\d.]+) \((\d+) of (\d+) guesses right\)", text)
    control = re.search(r"Noise-off control: lower bound ([\d.]+) \((\d+) of (\d+) right\)", text)
    done = subprocess.run(
        [str(VENV_BIN / "fedtransfer"), "audit", "--empirical", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    runs = json.loads(done.stdout)["empirical"]
    assert (f"{runs[0]['accounted_epsilon']:.2f}", f"{runs[0]['lower_bound']:.2f}") == honest.groups()[:2]
    assert (str(runs[0]["correct"]), str(runs[0]["guesses"])) == honest.groups()[2:]
    assert (f"{runs[1]['lower_bound']:.2f}", str(runs[1]["correct"]), str(runs[1]["guesses"])) == control.groups()


FIGURES: dict[str, Callable] = {
    "quick-start": test_the_quick_start_figures,
    "imaging": test_the_imaging_figures,
    "release-share": test_the_release_share_figures,
    "empirical-audit": test_the_empirical_audit_figures,
}
