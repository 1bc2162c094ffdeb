"""A site's own configuration file (TOML): who it is and where its data and state live."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

SITE_CONFIG_FILE = "site.toml"


class SiteConfigError(ValueError):
    """The site configuration is missing or invalid."""


@dataclass(frozen=True)
class SiteConfig:
    """``site_id`` names the site in reports; ``data_path`` and ``state_dir`` are local paths."""

    site_id: str
    data_path: Path
    state_dir: Path
    label_column: str = "label"

    def to_toml(self) -> str:
        return (
            "# fedtransfer site configuration\n"
            f"site-id = {json.dumps(self.site_id)}\n"
            f"data-path = {json.dumps(str(self.data_path))}\n"
            f"state-dir = {json.dumps(str(self.state_dir))}\n"
            f"label-column = {json.dumps(self.label_column)}\n"
        )

    @classmethod
    def from_mapping(cls, raw: dict, origin: str) -> "SiteConfig":
        missing = [k for k in ("site-id", "data-path", "state-dir") if k not in raw]
        if missing:
            raise SiteConfigError(f"{origin} is missing {', '.join(missing)}")
        return cls(
            site_id=str(raw["site-id"]),
            data_path=Path(str(raw["data-path"])).expanduser(),
            state_dir=Path(str(raw["state-dir"])).expanduser(),
            label_column=str(raw.get("label-column", "label")),
        )

    @classmethod
    def load(cls, path: Path) -> "SiteConfig":
        if not path.is_file():
            raise SiteConfigError(f"site configuration {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise SiteConfigError(f"{path} is not valid TOML: {err}") from err
        return cls.from_mapping(raw, str(path))
