"""Manifest: schema, Parquet round trip (local and through a filesystem), counts, prepare_data entry point."""

import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from dinomaly.config import DataConfig
from dinomaly.data.layouts import read_layout
from dinomaly.data.manifest import (
    MANIFEST_SCHEMA,
    build_manifest,
    count_rows,
    format_counts,
    load_manifest,
    read_manifest,
    select,
    write_manifest,
)

REPO = Path(__file__).resolve().parent.parent


def test_schema_has_the_contract_columns():
    assert MANIFEST_SCHEMA.names == ["image_uri", "mask_uri", "label", "category", "defect", "split",
                                     "sample_id", "view", "size_bytes"]
    assert MANIFEST_SCHEMA.field("label").type == pa.int8()
    assert MANIFEST_SCHEMA.field("mask_uri").nullable and not MANIFEST_SCHEMA.field("image_uri").nullable


def test_round_trip_keeps_every_value_and_order(realiad_root, tmp_path):
    table = build_manifest(read_layout(str(realiad_root), "realiad"))
    written = write_manifest(table, str(tmp_path / "sub" / "m.parquet"))
    back = read_manifest(written)
    assert back.schema.equals(MANIFEST_SCHEMA) and back.equals(table)
    assert back.column("view").null_count == 0 and back.column("mask_uri").null_count == 30


def test_round_trip_through_a_filesystem(mvtec_root):
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    table = build_manifest(read_layout(str(mvtec_root), "mvtec"))
    uri = write_manifest(table, "/manifests/mvtec.parquet", filesystem=fs)
    assert uri == "memory:///manifests/mvtec.parquet"
    assert read_manifest("/manifests/mvtec.parquet", filesystem=fs).equals(table)


def test_read_manifest_errors(tmp_path, mvtec_root):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        read_manifest(str(tmp_path / "absent.parquet"))
    table = build_manifest(read_layout(str(mvtec_root), "mvtec")).drop_columns(["split"])
    pq.write_table(table, tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=r"lacks columns \['split'\]"):
        read_manifest(str(tmp_path / "old.parquet"))


def test_load_manifest_from_config_builds_or_reads_and_filters(mvtec_root, tmp_path):
    built = load_manifest(DataConfig(root=str(mvtec_root), layout="auto", categories=["carpet"]))
    assert set(built.column("category").to_pylist()) == {"carpet"}
    path = write_manifest(load_manifest(DataConfig(root=str(mvtec_root))), str(tmp_path / "m.parquet"))
    read = load_manifest(DataConfig(root=path, categories=["carpet"]))
    assert read.equals(built)
    with pytest.raises(ValueError, match=r"\['zipper'\] are not in the manifest.*\['bottle', 'carpet'\]"):
        load_manifest(DataConfig(root=path, categories=["zipper"]))
    assert select(read, split="train").num_rows == 3


def test_a_manifest_trained_config_reads_a_dataset_folder_by_its_own_layout(mvtec_root, tmp_path):
    """A model trained from a manifest keeps data.layout=manifest; evaluate/calibrate may then get a folder."""
    from_folder = load_manifest(DataConfig(root=str(mvtec_root), layout="manifest"))
    assert from_folder.equals(load_manifest(DataConfig(root=str(mvtec_root))))
    path = write_manifest(from_folder, str(tmp_path / "m"))  # a manifest file without the .parquet suffix
    assert load_manifest(DataConfig(root=path, layout="manifest")).equals(from_folder)
    with pytest.raises(FileNotFoundError, match="manifest .* not found"):
        load_manifest(DataConfig(root=str(tmp_path / "missing"), layout="manifest"))


def test_counts_table(mvtec_root, realiad_root):
    table = build_manifest(read_layout(str(mvtec_root), "mvtec"))
    rows = {r["category"]: r for r in count_rows(table)}
    assert rows["bottle"] == dict(category="bottle", train=3, train_anomalous=0, test_good=2, test_anomalous=3,
                                  masks=3, defects=2)
    text = format_counts(table)
    assert text.splitlines()[-1].split() == ["TOTAL", "6", "4", "6", "6", "4"]
    assert "train_anomalous" not in text
    fuiad = build_manifest(read_layout(str(realiad_root), "realiad", realiad_json_variant="realiad_jsons_fuiad_0.4"))
    assert "train_anomalous" in format_counts(fuiad)


def test_prepare_data_pipeline_writes_manifest_and_prints_counts(folder_root, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "pipelines"))
    sys.modules.pop("prepare_data", None)
    import prepare_data

    out = tmp_path / "out" / "custom.parquet"
    assert prepare_data.main(["--data", str(folder_root), "--output", str(out), "--categories", "widget"]) == 0
    printed = capsys.readouterr().out
    assert "widget" in printed and "gadget" not in printed and str(out) in printed
    assert read_manifest(str(out)).num_rows == 7


def test_a_file_that_is_no_parquet_is_named(tmp_path):
    (tmp_path / "manifest.parquet").write_bytes(b"hello\n")
    with pytest.raises(ValueError, match=r"manifest\.parquet is not a readable Parquet manifest"):
        read_manifest(str(tmp_path / "manifest.parquet"))
