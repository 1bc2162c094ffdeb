"""Bring your own scenario: a ``scenario.toml`` that names a source and target sites' CSV or NPZ files.

The file is read strictly: an unknown table or key is an error that names the table, the
key and the keys that are allowed (a typo never passes silently).
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from common.data.scenario import ARCHITECTURES, ModelSpec, Scenario, ScenarioError
from common.data.site_data import (
    SiteData,
    csv_feature_names,
    infer_input_shape,
    load_site_data,
    site_files,
)
from common.model.pretrain_settings import PretrainConfig, PretrainError
from common.model.transfer import PolicyParseError, TransferPolicy
from common.model.zoo import architecture_arguments, is_pretrained

TABLES = {
    "scenario": ("name", "description", "class_names", "label_column", "preprocessing", "input_shape"),
    "model": ("arch", "transfer_policy"),  # plus the architecture's own arguments
    "pretrain": ("epochs", "lr", "batch_size", "optimizer", "class_weights", "validation_fraction", "patience"),
    "source": ("path", "description", "name"),
    "sites": ("name", "path"),
}


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str, file: Path) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ScenarioError(
                f"{file}: unknown key {key!r} in {where}{hint}; allowed keys: {', '.join(allowed)}; see docs/data.md"
            )


def _table(document: dict[str, Any], key: str, file: Path) -> dict[str, Any]:
    value = document.get(key)
    if not isinstance(value, dict):
        raise ScenarioError(f"{file}: missing [{key}] table; see docs/data.md for a complete example")
    _check_keys(value, TABLES[key], f"[{key}]", file)
    return value


def _required(table: dict[str, Any], key: str, where: str, file: Path, kind: type = str) -> Any:
    if key not in table:
        raise ScenarioError(f"{file}: missing key {key!r} in {where}; see docs/data.md")
    value = table[key]
    if not isinstance(value, kind):
        raise ScenarioError(f"{file}: {where} {key} must be a {kind.__name__}, got {value!r}")
    return value


def _check_transfer_policy(transfer: Any, file: Path) -> str:
    try:
        return str(TransferPolicy.parse(transfer if isinstance(transfer, str) else repr(transfer)))
    except PolicyParseError:
        raise ScenarioError(
            f"{file}: [model] transfer_policy {transfer!r} must be 'head', 'last:K' (K >= 1), 'full', 'bias' or "
            "'lora:R' (R >= 1)"
        ) from None


def _model_spec(document: dict[str, Any], file: Path) -> tuple[ModelSpec, str]:
    table = document.get("model")
    if not isinstance(table, dict):
        raise ScenarioError(f"{file}: missing [model] table; see docs/data.md for a complete example")
    arch = _required(table, "arch", "[model]", file)
    if arch not in ARCHITECTURES and not is_pretrained(arch):
        raise ScenarioError(
            f"{file}: [model] arch {arch!r} is unknown; use one of {list(ARCHITECTURES)}, torchvision:NAME or "
            "timm:NAME (see docs/models.md)"
        )
    arguments = architecture_arguments(arch)
    _check_keys(table, (*TABLES["model"], *arguments), f"[model] (arch {arch!r})", file)
    transfer = _check_transfer_policy(table.get("transfer_policy", "head"), file)
    args = {key: value for key, value in table.items() if key not in TABLES["model"]}
    return ModelSpec(arch, args), transfer


def _check_shape(arch: str, shape: tuple[int, ...], file: Path) -> None:
    image = arch == "cnn" or is_pretrained(arch)
    if image and len(shape) != 3:
        raise ScenarioError(
            f"{file}: arch {arch!r} needs image data: x of shape (n, C, H, W), or (n, H, W) for grey images, or set "
            f"[scenario] input_shape; the data has rows of shape {shape}"
        )
    if not image and len(shape) != 1:
        raise ScenarioError(
            f"{file}: arch {arch!r} needs tabular data (n, features); the data has rows of shape {shape}; "
            "use arch = 'cnn' for images"
        )


def _pretrain(document: dict[str, Any], file: Path) -> dict[str, Any]:
    if "pretrain" not in document:
        return {}
    table = _table(document, "pretrain", file)
    try:
        PretrainConfig(**table)
    except PretrainError as err:
        raise ScenarioError(f"{file}: [pretrain] {err}") from None
    return dict(table)


def load_study(file: Path, seed: int) -> Scenario:
    if not file.is_file():
        raise ScenarioError(f"{file}: scenario file not found")
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ScenarioError(f"{file}: not valid TOML ({err})") from None
    unknown = sorted(set(document) - set(TABLES))
    if unknown:
        raise ScenarioError(
            f"{file}: unknown table(s) {', '.join(f'[{t}]' for t in unknown)}; allowed: [scenario], [model], "
            "[pretrain], [source], [[sites]]"
        )
    head = _table(document, "scenario", file)
    name = _required(head, "name", "[scenario]", file)
    class_names = tuple(str(c) for c in _required(head, "class_names", "[scenario]", file, list))
    if len(class_names) < 2:
        raise ScenarioError(f"{file}: [scenario] class_names needs at least 2 names, got {list(class_names)}")
    label_column = head.get("label_column", "label")
    model, transfer = _model_spec(document, file)
    pretrain = _pretrain(document, file)

    source_table = document.get("source")
    if source_table is not None and not isinstance(source_table, dict):
        raise ScenarioError(f"{file}: [source] must be a table with a 'path'")
    if source_table is not None:
        _check_keys(source_table, TABLES["source"], "[source]", file)
    site_tables = document.get("sites")
    if not isinstance(site_tables, list) or not site_tables:
        raise ScenarioError(f"{file}: no [[sites]] entries; add at least one target site with name and path")
    entries = []
    for position, table in enumerate(site_tables, start=1):
        where = f"[[sites]] entry {position}"
        _check_keys(table, TABLES["sites"], where, file)
        entries.append((_required(table, "name", where, file), file.parent / _required(table, "path", where, file)))
    names = [entry[0] for entry in entries]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{file}: site names must be unique, got {names}")
    source_path = file.parent / _required(source_table, "path", "[source]", file) if source_table else None

    first = source_path or entries[0][1]
    shape = tuple(head["input_shape"]) if "input_shape" in head else infer_input_shape(first, label_column)
    _check_shape(model.arch, shape, file)
    first_file = site_files(first)[0]
    feature_names = tuple(csv_feature_names(first_file, label_column)) if first_file.suffix.lower() == ".csv" else None

    def load(path: Path, site_name: str) -> SiteData:
        return load_site_data(path, shape, len(class_names), label_column=label_column, name=site_name, seed=seed)

    source = load(source_path, source_table.get("name", "source")) if source_path else None
    return Scenario(
        name=name,
        description=head.get("description", ""),
        source=source,
        sites=tuple(load(path, site_name) for site_name, path in entries),
        input_shape=shape,
        class_names=class_names,
        feature_names=feature_names,
        model=model,
        transfer_policy=transfer,
        source_description=(source_table or {}).get(
            "description", f"source data {source_path.name}" if source_path else "none (trained from scratch)"
        ),
        preprocessing=head.get("preprocessing", "none: features used as provided by each site"),
        pretrain=pretrain,
    )
