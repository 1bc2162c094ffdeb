"""A site's own configuration file (TOML): who it is, where its data, state and keys live."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigurationError

SITE_CONFIG_FILE = "site.toml"
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


def site_dir(root: Path, partition_id: int) -> Path:
    """The folder of simulated site ``partition_id`` under a simulation root."""
    return Path(root) / f"site-{partition_id}"
