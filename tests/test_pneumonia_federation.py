"""The import path end to end on real chest X-rays: pretrain, save as torchvision, import, federate under DP.

The coordinator pretrains the scenario's ResNet-18 on a small part of the source hospital (one
epoch: this test checks the path, not the accuracy; BENCHMARKS.md has the accuracy), saves it
under torchvision's state-dict names with ``torch.save`` as torchvision's own files are, imports
that file with ``import-model``'s code, and runs one DP round of the real apps with the ``head``
policy at the three target hospitals.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client.app import app as client_app
from common.data.site_data import SiteData, Split
from common.model.checkpoint import load_checkpoint
from common.model.importing import ImportRequest, import_model, torchvision_state_dict
from common.model.pretraining import pretrain_source
from common.settings import RunSettings
from simulations.inprocess import DirectGrid, run_on_grid
from tests.test_pneumonia import DATA_DIR
from tests.test_pneumonia import pytestmark as data_present

pytestmark = [data_present, pytest.mark.federation]
ARCH = "torchvision:resnet18"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from common.data.scenarios import load_scenario

    root = tmp_path_factory.mktemp("pneumonia")
    scenario = load_scenario("pneumonia", seed=0, data_dir=DATA_DIR)
    source = scenario.source
    small = replace(
        scenario,
        source=SiteData("source", Split(source.train.x[:256], source.train.y[:256]), source.test),
        pretrain={**scenario.pretrain, "epochs": 1},
    )
    card = pretrain_source(small, root / "source", seed=0)
    assert 0.5 < card.lineage["source_test"]["roc-auc"] <= 1.0  # the source model's test AUC is in its card
    model, _ = load_checkpoint(root / "source")
    weights = root / "resnet18-pneumonia.pth"
    torch.save(torchvision_state_dict(model, ARCH), weights)
    request = ImportRequest(
        arch=ARCH,
        weights=weights,
        input_shape=tuple(card.input_shape),
        class_names=tuple(card.class_names),
        channels="repeat",
        resize=0,
        mean=tuple(card.arch_args["mean"]),
        std=tuple(card.arch_args["std"]),
        licence=card.licence,
        pretraining_data=card.pretraining_data,
    )
    import_model(request, root / "imported")
    return root, root / "imported"


def test_the_imported_model_is_the_pretrained_backbone(imported: tuple[Path, Path]) -> None:
    root, checkpoint = imported
    source, _ = load_checkpoint(root / "source")
    model, card = load_checkpoint(checkpoint)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().backbone(x), source.eval().backbone(x), rtol=0, atol=0)
    assert card.licence.startswith("CC BY 4.0") and card.lineage["kind"] == "imported"


def test_one_private_round_at_three_hospitals_trains_only_the_head(imported: tuple[Path, Path]) -> None:
    root, checkpoint = imported
    grid = DirectGrid(client_app, num_nodes=3)
    settings = RunSettings(
        scenario="pneumonia",
        data_dir=str(DATA_DIR),
        checkpoint=str(checkpoint),
        transfer_policy="head",
        rounds=1,
        local_epochs=1,
        batch_size=32,
        lr=0.1,
        target_epsilon=3.0,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=3,
        expected_sites=3,
    )
    record = run_on_grid(grid, settings)
    assert record.status == "completed"
    assert sorted(record.round(1).aggregated_sites) == ["hospital-a", "hospital-b", "hospital-c"]
    assert record.traffic["update-bytes-per-site-per-round"] == (512 * 2 + 2) * 4
    assert record.traffic["trainable-tensors"] == 2
    assert record.traffic["base-model-bytes-per-site"] > 40_000_000  # ResNet-18: sent once, never per round
    base, _ = load_checkpoint(checkpoint)
    final, card = load_checkpoint(Path(record.final_checkpoint))
    assert card.licence == load_checkpoint(checkpoint)[1].licence
    for name, tensor in base.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(final.state_dict()[name], tensor), f"{name} changed under the head policy"
    assert not torch.equal(final.head.weight, base.head.weight)
    spilled = [p for p in (root / "sites").rglob("feature-cache") if p.is_dir()]
    assert not any(any(p.iterdir()) for p in spilled)  # 3 sites x 512 features fit the memory budget
