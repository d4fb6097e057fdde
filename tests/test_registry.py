"""The registry is data, validated at load: every broken reference or missing classification is refused."""

import shutil
from pathlib import Path

import pytest
import yaml

from zqdata.registry import RegistryError, load_registry
from zqdata.settings import repo_root


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "registry"
    shutil.copytree(repo_root() / "registry", dst)
    return dst


def _edit_dataset(directory: Path, code: str, edit) -> None:
    path = directory / "datasets" / f"{code}.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(doc)
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")


def test_shipped_registry_loads_with_every_stage_of_the_path():
    reg = load_registry()
    assert len(reg.agencies) >= 5 and len([d for d in reg.datasets.values()]) >= 6
    for ds in reg.datasets.values():
        assert ds.agency in reg.agencies
        for f in ds.fields:
            assert f.cn_name and f.description


def test_field_without_classification_is_refused(registry_copy):
    _edit_dataset(registry_copy, "resident_population", lambda d: d["fields"][0].pop("class"))
    with pytest.raises(RegistryError, match="class"):
        load_registry(registry_copy)


def test_dataset_of_unknown_agency_is_refused(registry_copy):
    _edit_dataset(registry_copy, "water_usage", lambda d: d.update(agency="no_such_agency"))
    with pytest.raises(RegistryError, match="unknown agency 'no_such_agency'"):
        load_registry(registry_copy)


def test_scenario_authorizing_an_unknown_field_is_refused(registry_copy):
    path = registry_copy / "scenarios.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["scenarios"][0]["authorized_fields"]["enterprise_registry"].append("no_such_field")
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RegistryError, match="no_such_field"):
        load_registry(registry_copy)


def test_unknown_code_table_is_refused(registry_copy):
    def edit(d):
        d["fields"][2]["code_table"] = "nope"

    _edit_dataset(registry_copy, "bus_card_swipes", edit)
    with pytest.raises(RegistryError, match="unknown code table 'nope'"):
        load_registry(registry_copy)
