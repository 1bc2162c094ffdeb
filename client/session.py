"""Who this site is, loaded once per process: configuration, keys, manifest, privacy policy.

The files are read again only when one of them changes (size or modification time), so a
site operator's edit to the policy takes effect at the next message while a run's many
messages do not re-read keys from disk.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.site_config import (
    SITE_CONFIG_FILE,
    SiteConfig,
    SiteConfigError,
    simulated_site_dir,
)
from common.privacy.dataset_id import dataset_key, identities
from common.privacy.ledger import Ledger
from common.privacy.policy import PolicyError, SitePolicy, load_policy
from common.security.keys import Identity, passphrase_from_env, read_identity
from common.security.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetIdentity:
    """A dataset as the ledger knows it: its keyed id, and the id its older entries used (the content hash)."""

    keyed: str
    content_hash: str

    @property
    def aliases(self) -> tuple[str, ...]:
        return (self.content_hash,)


@dataclass(frozen=True)
class SiteSession:
    """The site's configuration, its private identity, the federation manifest and its privacy policy.

    A policy file that does not load is reported when the policy is first needed, so the
    site can still seal an error reply with its keys.
    """

    config: SiteConfig
    identity: Identity
    manifest: Manifest
    loaded_policy: SitePolicy | None
    policy_error: PolicyError | None = None

    @property
    def policy(self) -> SitePolicy:
        if self.loaded_policy is None:
            raise self.policy_error or PolicyError(f"{self.config.policy_path}: no privacy policy")
        return self.loaded_policy

    @property
    def site_id(self) -> str:
        return self.config.site_id

    def dataset(self, content_hash: str) -> DatasetIdentity:
        """The keyed identity of the dataset whose files hash to ``content_hash``.

        A new state directory first gets its signed genesis ledger head, then its
        dataset-identity key, so a ledger deleted later is always noticed.
        """
        Ledger(self.config.state_dir, signer=self.identity).initialise()
        keyed, content = identities(dataset_key(self.config.state_dir), content_hash)
        return DatasetIdentity(keyed, content)


def site_config(node_config: Mapping[str, Any], sim_root: str) -> SiteConfig:
    """The site's configuration, from this node's own configuration only (never from a message).

    A deployed SuperNode points at its site file (``--node-config 'site-config="/srv/site/site.toml"'``)
    or gives the same keys inline. A node of Flower's simulation engine has only a ``partition-id``;
    its site folder lies under ``sim_root``, the simulation root the ClientApp was bound to on this machine.
    """
    if "site-config" in node_config:
        return SiteConfig.load(Path(str(node_config["site-config"])).expanduser())
    if "data-path" in node_config:
        return SiteConfig.from_mapping(dict(node_config), origin="node config")
    if "partition-id" in node_config:
        if not sim_root:
            raise SiteConfigError(
                "this node is a simulated site (it has a partition-id) but this machine names no simulation root: "
                "run it with `fedtransfer simulate`, or set FEDTRANSFER_SIM_ROOT where the simulation runs"
            )
        return SiteConfig.load(simulated_site_dir(Path(sim_root), int(node_config["partition-id"])) / SITE_CONFIG_FILE)
    raise SiteConfigError(
        "the node config names no site: start flower-supernode with --node-config 'site-config=\"/path/to/site.toml\"'"
    )


def _stamp(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    stamps = []
    for path in paths:
        try:
            status = path.stat()
            stamps.append((str(path), status.st_size, status.st_mtime_ns))
        except OSError:
            stamps.append((str(path), -1, -1))
    return tuple(stamps)


def _watched(config: SiteConfig) -> list[Path]:
    keys = sorted(config.keys_dir.glob(f"{config.site_id}.*")) if config.keys_dir.is_dir() else []
    return [*keys, config.manifest, config.policy_path]


_SESSIONS: dict[SiteConfig, tuple[tuple[tuple[str, int, int], ...], SiteSession]] = {}
_MANIFESTS: dict[tuple[str, str], Manifest] = {}
MANIFEST_CACHE_SIZE = 4


def _manifest(path: Path, coordinator_fingerprint: str) -> Manifest:
    """The verified manifest in ``path``; one object per distinct content, so that the simulated sites a
    process serves, each holding its own copy of the federation's manifest, do not each keep one."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return read_manifest(path, coordinator_fingerprint)  # it says what is wrong with the file
    key = (hashlib.sha256(text.encode("utf-8")).hexdigest(), coordinator_fingerprint)
    if key not in _MANIFESTS:
        if len(_MANIFESTS) >= MANIFEST_CACHE_SIZE:
            del _MANIFESTS[next(iter(_MANIFESTS))]
        _MANIFESTS[key] = Manifest.from_json(text, coordinator_fingerprint)
    return _MANIFESTS[key]


def site_session(node_config: Mapping[str, Any], sim_root: str) -> SiteSession:
    """This node's :class:`SiteSession`, re-read only when its key, manifest or policy files change."""
    config = site_config(node_config, sim_root)
    stamp = _stamp(_watched(config))
    cached = _SESSIONS.get(config)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        policy, problem = load_policy(config.policy_path), None
    except PolicyError as err:
        policy, problem = None, err
    session = SiteSession(
        config=config,
        identity=read_identity(config.keys_dir, config.site_id, passphrase_from_env()),
        manifest=_manifest(config.manifest, config.coordinator_fingerprint),
        loaded_policy=policy,
        policy_error=problem,
    )
    _SESSIONS[config] = (stamp, session)
    log.debug("site %s: loaded its configuration, keys, manifest and policy", config.site_id)
    return session
