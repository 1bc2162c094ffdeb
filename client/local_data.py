"""The site's data, loaded and validated once per process, and its frozen-prefix features (``client.feature_cache``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from client.feature_cache import FeatureCache, Features
from common.data.site_config import SiteConfig
from common.data.site_data import SiteData, dataset_fingerprint, load_site_data
from common.model.checkpoint import ModelCard
from common.model.training import as_tensors, compute_features
from common.model.transfer import TransferPolicy, state_fingerprint
from common.model.zoo import FedModel


@dataclass(frozen=True)
class LocalData:
    """A site's validated data and the sha256 of its files (which never leaves the site)."""

    data: SiteData
    content_hash: str


@lru_cache(maxsize=4)
def _load(
    path: Path, fingerprint: str, input_shape: tuple[int, ...], num_classes: int, label_column: str, name: str
) -> SiteData:
    return load_site_data(
        path, input_shape, num_classes, label_column=label_column, name=name, require_two_train_classes=False
    )


def load_local_data(site: SiteConfig, card: ModelCard) -> LocalData:
    """Load the site's data, validated against the model card (cached while the files are unchanged)."""
    fingerprint = dataset_fingerprint(site.data_path)
    data = _load(
        site.data_path, fingerprint, tuple(card.input_shape), card.num_classes, site.label_column, site.site_id
    )
    return LocalData(data=data, content_hash=fingerprint)


FEATURES = FeatureCache()  # one per process: a simulation worker serves several sites in turn


def frozen_features(
    local: LocalData, model: FedModel, transfer: TransferPolicy, spill_dir: Path | None = None
) -> Features:
    """Run the frozen prefix once per (dataset, frozen prefix, policy) and reuse the result (see ``FeatureCache``).

    ``spill_dir`` (the site's state directory's ``feature-cache``) holds features spilled above the memory budget.
    """
    frozen, _ = transfer.split(model)
    key = FEATURES.key(local.content_hash, repr(frozen), state_fingerprint(transfer.frozen_state(model)), str(transfer))

    def compute() -> Features:
        train_x, train_y = as_tensors(local.data.train.x, local.data.train.y)
        test_x, test_y = as_tensors(local.data.test.x, local.data.test.y)
        return Features(compute_features(frozen, train_x), train_y, compute_features(frozen, test_x), test_y)

    return FEATURES.get(key, compute, spill_dir)
