"""A site runs only app code it approved: its signed list of FAB hashes, and the check in front of flwr-clientapp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.cli import main as cli
from common.data.site_config import SiteConfig
from common.deploy.approved_apps import (
    AppNotApproved,
    ApprovedApp,
    ApprovedApps,
    ApprovedAppsError,
    approve_app,
    approved_apps_path,
    fab_sha256,
    load_site_approvals,
    write_approved_apps,
)
from common.deploy.clientapp_gate import gated_install
from common.deploy.provision import BIN_DIR, CLIENTAPP_GATE, SUPERNODE_SCRIPT, Endpoint, ProvisionRequest, provision
from common.deploy.site_check import ERROR, OK, WARNING, check_kit
from common.security.keys import Identity, read_identity

SITE = "hospital-a"
TINY_APP = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "{version}"
dependencies = []

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
"""


@pytest.fixture()
def kit(tmp_path: Path) -> Path:
    """A test-provisioned site kit (its keys made in it), as installed at the site."""
    result = provision(ProvisionRequest("approvals", [SITE], [Endpoint("127.0.0.1", 9092)], tmp_path / "kits"))
    return result.site_kits[SITE]


def build_fab(root: Path, version: str = "1.0.0") -> bytes:
    """A real Flower App Bundle of a tiny app, as `flwr build` writes it."""
    from flwr.cli.build import build_fab_from_disk

    app = root / f"tinyapp-{version.replace('.', '-')}"
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TINY_APP.format(version=version))
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "client.py").write_text("raise RuntimeError('the app was imported')\n")
    return build_fab_from_disk(app)


def site(kit: Path) -> SiteConfig:
    return SiteConfig.load(kit / "site.toml")


def identity(kit: Path) -> Identity:
    return read_identity(kit / "keys", SITE)


def test_flower_installs_the_fab_before_it_imports_the_app() -> None:
    """The gate's seam: Flower's ClientApp process calls install_from_fab on the FAB's bytes before loading the app."""
    import inspect

    from flwr.supernode.runtime import run_clientapp

    source = inspect.getsource(run_clientapp.run_clientapp)
    assert "install_from_fab(fab.content" in source
    assert source.index("install_from_fab(fab.content") < source.index("load_client_app_fn(")
    assert source.index("pull_task_input(client)") < source.index("install_from_fab(fab.content")


def load_site_approvals_or_error(kit: Path) -> ApprovedApps | ApprovedAppsError:
    try:
        return load_site_approvals(site(kit))
    except ApprovedAppsError as err:
        return err


def test_an_approval_is_signed_by_the_site_and_verified(kit: Path, tmp_path: Path) -> None:
    fab = build_fab(tmp_path)
    app = approve_app(site(kit), fab, "tinyapp 1.0.0, reviewed by the site", identity(kit))
    assert app.fab_sha256 == fab_sha256(fab) and app.note == "tinyapp 1.0.0, reviewed by the site"
    again = approve_app(site(kit), fab, "twice", identity(kit))
    assert again == app  # an app approved again keeps its first approval
    approvals = load_site_approvals(site(kit))
    assert approvals.apps == (app,) and approvals.approves(fab_sha256(fab))
    assert not approvals.approves(fab_sha256(build_fab(tmp_path, "1.0.1")))
    assert approved_apps_path(site(kit)).stat().st_mode & 0o777 == 0o644


def test_an_edited_list_is_refused(kit: Path, tmp_path: Path) -> None:
    approve_app(site(kit), build_fab(tmp_path), "reviewed", identity(kit))
    path = approved_apps_path(site(kit))
    document = json.loads(path.read_text())
    document["apps"].append({"fab_sha256": "ab" * 32, "note": "slipped in", "approved_at": "2026-01-01T00:00:00+00:00"})
    path.write_text(json.dumps(document))
    with pytest.raises(ApprovedAppsError, match="not signed by site hospital-a's key"):
        load_site_approvals(site(kit))
    with pytest.raises(ApprovedAppsError, match="not signed"):  # nor is a new approval signed on top of it
        approve_app(site(kit), build_fab(tmp_path, "2.0.0"), "next", identity(kit))


def test_a_list_signed_by_another_key_is_refused(kit: Path, tmp_path: Path) -> None:
    impostor = Identity.generate(SITE)  # same name, other key: not the one the manifest lists
    forged = ApprovedApps(SITE, (ApprovedApp(fab_sha256(build_fab(tmp_path)), "forged", "2026-01-01T00:00:00+00:00"),))
    write_approved_apps(forged, approved_apps_path(site(kit)), impostor)
    with pytest.raises(ApprovedAppsError, match="not signed by site hospital-a's key"):
        load_site_approvals(site(kit))
    approved_apps_path(site(kit)).unlink()
    with pytest.raises(ApprovedAppsError, match="approve with the site's own keys"):
        approve_app(site(kit), build_fab(tmp_path, "2.0.0"), "impostor", impostor)


def test_repeated_keys_in_the_list_are_refused(kit: Path, tmp_path: Path) -> None:
    approve_app(site(kit), build_fab(tmp_path), "reviewed", identity(kit))
    path = approved_apps_path(site(kit))
    text = path.read_text()
    path.write_text(text.replace('"site": "hospital-a"', '"site": "hospital-a", "site": "hospital-a"', 1))
    with pytest.raises(ApprovedAppsError, match="appears twice"):
        load_site_approvals(site(kit))


def test_the_gate_refuses_an_unapproved_fab_before_installing_it(
    kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.install import install_from_fab

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    approved, other = build_fab(tmp_path), build_fab(tmp_path, "6.6.6")
    config = kit / "site.toml"
    install = gated_install(install_from_fab, load_site_approvals_or_error(kit), config)
    with pytest.raises(AppNotApproved) as refused:
        install(approved, skip_prompt=True)  # no list yet: every app is refused
    assert "has approved no app yet" in str(refused.value)
    assert not (tmp_path / "flwr-home").exists()

    approve_app(site(kit), approved, "reviewed", identity(kit))
    install = gated_install(install_from_fab, load_site_approvals(site(kit)), config)
    with pytest.raises(AppNotApproved) as refused:
        install(other, skip_prompt=True)
    message = str(refused.value)
    assert "\n" not in message and fab_sha256(other)[:16] in message
    assert f"fedtransfer site approve-app FAB_FILE --site {config}" in message
    assert not (tmp_path / "flwr-home").exists(), "nothing of an unapproved app may be installed"

    installed = install(approved, skip_prompt=True)
    assert installed.is_dir() and installed.parent == tmp_path / "flwr-home" / "apps"
    assert fab_sha256(approved)[:8] in installed.name


def test_the_cli_approves_lists_and_site_check_reports(kit: Path, tmp_path: Path, capsys) -> None:
    def approvals() -> list:
        return [f for f in check_kit(kit) if f.check == "approved apps"]

    assert [f.level for f in approvals()] == [WARNING] and "no app approved yet" in approvals()[0].message
    fab_file = tmp_path / "tinyapp.fab"
    fab_file.write_bytes(build_fab(tmp_path))
    assert cli.main(["site", "approve-app", str(fab_file), "--site", str(kit)]) == 0
    assert fab_sha256(fab_file.read_bytes()) in capsys.readouterr().out
    assert load_site_approvals(site(kit)).apps[0].note == "tinyapp 1.0.0"
    assert cli.main(["site", "approved-apps", "--site", str(kit)]) == 0
    assert fab_sha256(fab_file.read_bytes())[:16] in capsys.readouterr().out
    assert [f.level for f in approvals()] == [OK]

    not_a_fab = tmp_path / "notes.fab"
    not_a_fab.write_text("not a zip")
    assert cli.main(["site", "approve-app", str(not_a_fab), "--site", str(kit)]) == ApprovedAppsError.exit_status
    assert "is not a Flower App Bundle" in capsys.readouterr().err

    approved_apps_path(site(kit)).write_text(approved_apps_path(site(kit)).read_text().replace("tinyapp", "otherapp"))
    assert [f.level for f in approvals()] == [ERROR]
    (kit / BIN_DIR / CLIENTAPP_GATE).unlink()
    assert any("without it the SuperNode runs any app" in f.message for f in approvals())


def test_the_kit_runs_its_clientapps_through_the_gate(kit: Path) -> None:
    gate = kit / BIN_DIR / CLIENTAPP_GATE
    assert os.access(gate, os.X_OK)
    assert f'fedtransfer site clientapp --site {kit / "site.toml"} -- "$@"' in gate.read_text()
    assert f"export PATH={kit / BIN_DIR}:" in (kit / SUPERNODE_SCRIPT).read_text()
