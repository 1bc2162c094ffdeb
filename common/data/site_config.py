"""A site's own configuration file (TOML): who it is, where its data, state and keys live."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigurationError
from common.io import parse_json

SITE_CONFIG_FILE = "site.toml"
#: Under a simulation root: the simulated sites' names in Flower's partition order (JSON list).
SIMULATED_SITES_FILE = "simulated-sites.json"
#: Where a simulated ClientApp run by ``flwr run`` finds the simulation root (set on the machine that runs it).
SIM_ROOT_ENV = "FEDTRANSFER_SIM_ROOT"
_REQUIRED = ("site-id", "data-path", "state-dir", "keys-dir", "manifest", "coordinator-fingerprint")
_OPTIONAL = ("label-column", "privacy-policy")


class SiteConfigError(ConfigurationError, ValueError):
    """The site configuration is missing or invalid."""


@dataclass(frozen=True)
class SiteConfig:
    """Paths are local to the site.

    ``keys_dir`` holds the site's private keys; ``manifest`` is the coordinator-signed list
    of federation members, checked against ``coordinator_fingerprint`` (received out of band).
    ``privacy_policy`` is the site's own privacy policy file (default: ``state_dir/privacy-policy.toml``).
    """

    site_id: str
    data_path: Path
    state_dir: Path
    keys_dir: Path
    manifest: Path
    coordinator_fingerprint: str
    label_column: str = "label"
    privacy_policy: Path | None = None

    @property
    def policy_path(self) -> Path:
        return self.privacy_policy or self.state_dir / "privacy-policy.toml"

    def to_toml(self) -> str:
        lines = ["# fedtransfer site configuration"]
        for key in _REQUIRED + _OPTIONAL:
            value = getattr(self, key.replace("-", "_"))
            if value is not None:
                lines.append(f"{key} = {json.dumps(str(value))}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], origin: str) -> SiteConfig:
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise SiteConfigError(f"{origin} is missing {', '.join(missing)}")
        unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL) - {"partition-id", "num-partitions", "site-config"})
        if unknown:
            raise SiteConfigError(
                f"{origin} has unknown keys {unknown}; known keys: {', '.join(_REQUIRED + _OPTIONAL)}"
            )

        def path(key: str) -> Path:
            return Path(str(raw[key])).expanduser()

        return cls(
            site_id=str(raw["site-id"]),
            data_path=path("data-path"),
            state_dir=path("state-dir"),
            keys_dir=path("keys-dir"),
            manifest=path("manifest"),
            coordinator_fingerprint=str(raw["coordinator-fingerprint"]),
            label_column=str(raw.get("label-column", "label")),
            privacy_policy=path("privacy-policy") if "privacy-policy" in raw else None,
        )

    @classmethod
    def load(cls, path: Path) -> SiteConfig:
        if not path.is_file():
            raise SiteConfigError(f"site configuration {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise SiteConfigError(f"{path} is not valid TOML: {err}") from err
        return cls.from_mapping(raw, str(path))


def site_dir(root: Path, site_id: str) -> Path:
    """The folder of simulated site ``site_id`` under a simulation root: it bears the site's name."""
    if not site_id or site_id in (".", "..") or any(c in site_id for c in "/\\\0") or site_id != site_id.strip():
        raise SiteConfigError(f"site name {site_id!r} cannot name a folder; use letters, digits, '-', '_' and '.'")
    return Path(root) / site_id


def simulated_site_dir(root: Path, partition_id: int) -> Path:
    """The folder of the simulated site that Flower runs as ``partition_id``, from the root's index of sites."""
    index = Path(root) / SIMULATED_SITES_FILE
    try:
        names = parse_json(index.read_bytes())
    except (OSError, ValueError) as err:
        raise SiteConfigError(f"{index}: cannot read the index of simulated sites: {err}") from err
    if not isinstance(names, list) or not 0 <= partition_id < len(names):
        raise SiteConfigError(f"{index} lists no simulated site for Flower partition {partition_id}")
    return site_dir(root, str(names[partition_id]))
