"""Which paths the audit reads: site state directories (with the site's public key) and coordinator runs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.data.site_config import SITE_CONFIG_FILE, SiteConfig, SiteConfigError
from common.privacy.audit.model import AuditInputError
from common.privacy.ledger import LEDGER_FILE, NON_PRIVATE_DIR
from common.run_record import RUN_RECORD_FILE
from common.security.keys import KeyFileError, PublicIdentity, read_public_identity
from common.security.manifest import ManifestError, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteInput:
    """A site state directory, the site id it belongs to, its policy file, and the key that signs its ledger.

    ``site_key`` comes from the coordinator-signed manifest the site holds (checked against the
    coordinator fingerprint in its ``site.toml``), else from its public key file; ``key_source``
    says which, or why there is none. From ``site.toml`` too, when there is one: the site's data
    (to name the dataset it holds now) and the coordinator fingerprint it received out of band.
    """

    site_id: str
    state_dir: Path
    policy_path: Path
    site_key: PublicIdentity | None
    key_source: str
    data_path: Path | None = None
    coordinator_fingerprint: str | None = None

    @property
    def data_name(self) -> str:
        """The site's data as an officer knows it: its path within the site folder, else in full."""
        if self.data_path is None:
            return ""
        folder = self.state_dir.parent
        path = self.data_path.expanduser().resolve()
        return f"{folder.name}/{path.relative_to(folder)}" if path.is_relative_to(folder) else str(path)


def _site_key(config: SiteConfig) -> tuple[PublicIdentity | None, str]:
    try:
        return read_manifest(config.manifest, config.coordinator_fingerprint).site(
            config.site_id
        ), f"manifest {config.manifest}"
    except (ManifestError, OSError) as exc:
        problem = f"manifest {config.manifest}: {exc}"
    public = config.keys_dir / f"{config.site_id}.pub.json"
    try:
        return read_public_identity(public), f"public key file {public}"
    except (KeyFileError, OSError) as exc:
        return None, f"{problem}; {public}: {exc}"


def site_input(state_dir: Path) -> SiteInput:
    state_dir = state_dir.resolve()
    config_path = state_dir.parent / SITE_CONFIG_FILE
    if config_path.is_file():
        try:
            config = SiteConfig.load(config_path)
        except SiteConfigError as exc:
            log.warning("ignoring %s: %s", config_path, exc)
        else:
            if config.state_dir.expanduser().resolve() == state_dir:
                key, source = _site_key(config)
                return SiteInput(
                    config.site_id,
                    state_dir,
                    config.policy_path,
                    key,
                    source,
                    config.data_path,
                    config.coordinator_fingerprint.strip().lower(),
                )
    name = state_dir.parent.name if state_dir.name == "state" else state_dir.name
    return SiteInput(
        name,
        state_dir,
        state_dir / "privacy-policy.toml",
        None,
        f"no {SITE_CONFIG_FILE} beside {state_dir} names the site's manifest or keys",
    )


def classify_inputs(paths: Sequence[Path]) -> tuple[list[SiteInput], list[Path]]:
    """Sort paths into site state directories and run-record files.

    Accepted: a state directory (holds ``privacy-ledger.jsonl``), a site folder (holds
    ``state/``), a run directory or its ``run-record.json``. A run directory with
    simulated sites under ``sites/*/state`` contributes those sites too.
    """
    sites: dict[Path, SiteInput] = {}
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file() and path.name == RUN_RECORD_FILE:
            runs.append(path.resolve())
            continue
        if not path.is_dir():
            raise AuditInputError(f"{path}: no such directory or run-record.json")
        found = False
        if (path / RUN_RECORD_FILE).is_file():
            runs.append((path / RUN_RECORD_FILE).resolve())
            found = True
            for ledger in sorted(path.glob(f"sites/*/state/{LEDGER_FILE}")):
                sites.setdefault(ledger.parent.resolve(), site_input(ledger.parent))
        for candidate in (path, path / "state"):
            if any((candidate / name).exists() for name in (LEDGER_FILE, NON_PRIVATE_DIR, "privacy-policy.toml")):
                sites.setdefault(candidate.resolve(), site_input(candidate))
                found = True
                break
        if not found:
            raise AuditInputError(
                f"{path}: neither a site state directory (with {LEDGER_FILE}), a site folder "
                f"(with state/), nor a coordinator run directory (with {RUN_RECORD_FILE})"
            )
    return list(sites.values()), list(dict.fromkeys(runs))
