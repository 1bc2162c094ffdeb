"""The Flower App's run config in pyproject.toml lists exactly the coordinator's settings."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from common.settings import RunSettings

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_run_config_has_every_setting_with_its_default() -> None:
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert list(table) == [f.name.replace("_", "-") for f in fields(RunSettings)]
    assert RunSettings.from_run_config(table) == RunSettings()


def test_components_point_at_the_apps() -> None:
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
