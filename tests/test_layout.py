"""The rooms stay apart: who may import whom, and what a deployed site loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")


def _imports(path: Path) -> set[str]:
    """Top-level packages of this project that a module imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("client", ("server", "simulations")),
        ("server", ("client", "simulations")),
    ],
)
def test_client_and_server_never_import_each_other(package: str, forbidden: tuple[str, ...]) -> None:
    offenders = {
        str(p.relative_to(REPO)): sorted(n for n in _imports(p) if n.split(".")[0] in forbidden)
        for p in _modules(package)
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_common_imports_no_side_but_its_cli() -> None:
    offenders = {}
    for path in _modules("common"):
        if (REPO / "common" / "cli") in path.parents:
            continue
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in ("client", "server", "simulations"))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders


def test_a_deployed_site_loads_no_scenario_or_downloader() -> None:
    script = (
        "import sys, client.app\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('common', 'client', 'server', "
        "'simulations', 'sklearn.datasets')))))\n"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    unused = {
        "common.data.scenarios",
        "common.data.scenario",
        "common.data.study",
        "common.data.wdbc",
        "common.data.heart_disease",
        "common.data.synthetic_imaging",
        "sklearn.datasets",
        "common.model.pretraining",
        "common.deploy",
        "common.cli",
    }
    assert not {m for m in loaded if m in unused or m.split(".")[0] in ("server", "simulations")}
    assert {"client.app", "common.privacy.egress", "common.privacy.ledger"} <= loaded


def test_the_coordinator_loads_no_simulator() -> None:
    """Simulated sites are the simulator's work, done before a run: the ServerApp never writes a site's folder."""
    script = (
        "import sys, server.app\nprint('\\n'.join(sorted(m for m in sys.modules if m.startswith('simulations'))))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []
