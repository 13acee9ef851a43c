"""Packed manifests: shards balanced by class and view, resumable packing, verification of every row (bad images
listed, masks of another size refused naming both files), corrupt shard rows counted or strict, packed rows
reading as the files they came from (locally, from S3 and through the Ray Data training stream); prepare_data's
--verify of a packed manifest reading its shards, Ctrl-C, refused flags, bad rows listed once, old shards named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_data import make_mvtec, make_realiad, write_image, write_mask

from dinomaly.config import Config, DataConfig, DinomalyConfig, apply_overrides
from dinomaly.data import pack
from dinomaly.data.dataset import ManifestDataset, iterate_batches
from dinomaly.data.manifest import MANIFEST_SCHEMA, is_packed, load_manifest, read_manifest, select
from dinomaly.data.pack import pack_manifest, packed_layout, plan_shards, verify_manifest
from dinomaly.data.reader import RowReader
from dinomaly.data.transforms import CorruptImageError, MaskSizeError, normalize

MODEL = DinomalyConfig(encoder_weights="none", image_size=32, crop_size=28)


def manifest_of(root) -> pa.Table:
    return load_manifest(DataConfig(root=str(root)))


def unpacked(packed: pa.Table) -> pa.Table:
    """The same rows, in the same order, read from their original files."""
    return packed.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def read_all(table: pa.Table, with_masks: bool = True, strict: bool = False):
    dataset = ManifestDataset(table, MODEL, with_masks=with_masks, strict=strict)
    batches = list(iterate_batches(dataset, batch_size=7))
    return dataset, batches


@pytest.fixture
def realiad_manifest(tmp_path) -> pa.Table:
    return manifest_of(make_realiad(tmp_path / "realiad"))


def test_shards_are_balanced_by_class_and_view_and_the_layout_is_recorded(realiad_manifest, tmp_path):
    source = realiad_manifest  # 2 classes x 5 views; train 20 rows, test 20 rows (with masks)
    train_bytes = sum(r["size_bytes"] for r in source.to_pylist() if r["split"] == "train")
    uri = pack_manifest(source, str(tmp_path / "packed"), shard_bytes=train_bytes // 4 + 1)
    packed = read_manifest(uri)
    assert is_packed(packed) and packed.num_rows == source.num_rows
    layout = packed_layout(packed)
    train = [s for s in layout["shards"] if s["split"] == "train"]
    assert len(train) == 4 and sum(s["rows"] for s in train) == 20 and min(s["rows"] for s in train) >= 4
    for shard in train:  # ~5 rows each: both classes, as evenly as the rows allow, and views spread out
        counts = shard["classes"].values()
        assert len(counts) == 2 and max(counts) - min(counts) <= 1
        assert max(shard["views"].values()) <= 2 and len(shard["views"]) >= 3
    test_classes = [list(s["classes"]) for s in layout["shards"] if s["split"] == "test"]
    assert test_classes[0] == ["audiojack"] and test_classes[-1] == ["toy"]  # classes contiguous for evaluation
    assert layout["bad_count"] == 0 and layout["rows_per_group"] == pack.ROWS_PER_GROUP
    # images keep their bytes, masks come along
    shard = pq.read_table(train[0]["uri"])
    for row in shard.select(["image_uri", "image_bytes"]).to_pylist():
        assert row["image_bytes"] == open(row["image_uri"], "rb").read()
    test_rows = [r for s in layout["shards"] if s["split"] == "test" for r in pq.read_table(s["uri"]).to_pylist()]
    with_mask = [r for r in test_rows if r["mask_uri"]]
    assert with_mask and all(r["mask_bytes"] == open(r["mask_uri"], "rb").read() for r in with_mask)


def test_packed_rows_read_exactly_as_their_files(demo_root, tmp_path):
    packed = read_manifest(pack_manifest(manifest_of(demo_root), str(tmp_path / "p.parquet"), shard_bytes=30_000))
    assert len(packed_layout(packed)["shards"]) > 2 and (tmp_path / "p-shards").is_dir()
    _, from_shards = read_all(packed)
    _, from_files = read_all(unpacked(packed))
    assert [b.uris for b in from_shards] == [b.uris for b in from_files]
    for a, b in zip(from_shards, from_files):
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert any(b.masks.sum() > 0 for b in from_shards)


def test_evaluate_reads_packed_rows_with_their_masks(demo_root, tmp_path):
    """evaluate's rows keep where packed bytes are, and its Ray Data map function reads them from the shards."""
    from dinomaly.distributed.batch.evaluate import test_rows
    from dinomaly.distributed.batch.scoring import read_rows

    local = shutil.copytree(demo_root, tmp_path / "demo")
    uri = pack_manifest(manifest_of(local), str(tmp_path / "packed"), shard_bytes=30_000)
    config = apply_overrides(Config(model=MODEL), {"data.root": uri, "data.fast_decode": False})
    packed = test_rows(config)
    assert {"shard_uri", "shard_row"} <= set(packed.column_names)
    reader = RowReader(32, 28, keep_errors=True)

    def read(table):
        return read_rows({k: np.asarray(v, dtype=object) for k, v in table.to_pydict().items()}, reader, 16, True)

    from_files = read(packed.drop_columns(["shard_uri", "shard_row"]))
    shutil.rmtree(local)  # from here on only the shards hold the images
    from_shards = read(packed)
    assert (from_shards["error"] == "").all() and from_shards["mask"].any()
    for key in ("image", "mask", "height", "width"):
        assert np.array_equal(from_shards[key], from_files[key])


def test_an_interrupted_pack_continues_and_keeps_finished_shards(mvtec_root, tmp_path, monkeypatch):
    source, out = manifest_of(mvtec_root), str(tmp_path / "packed")
    written = []
    write = pack._write_shard

    def failing_after_two(table, plan, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process dies mid-pack
        written.append(plan.name)
        return write(table, plan, *args)

    monkeypatch.setattr(pack, "_write_shard", failing_after_two)
    with pytest.raises(KeyboardInterrupt):
        pack_manifest(source, out, shard_bytes=1000)
    assert not (tmp_path / "packed" / "manifest.parquet").exists()
    first = tmp_path / "packed" / "shards" / written[0]
    stamp = first.stat().st_mtime_ns
    plans = plan_shards(source, 1000)
    written.clear()
    monkeypatch.setattr(pack, "_write_shard", lambda table, plan, *args: written.append(plan.name) or write(
        table, plan, *args))
    packed = read_manifest(pack_manifest(source, out, shard_bytes=1000))
    assert len(written) == len(plans) - 2 and first.stat().st_mtime_ns == stamp
    assert sorted(packed.column("image_uri").to_pylist()) == sorted(source.column("image_uri").to_pylist())
    written.clear()  # a different shard size is a different plan: nothing is kept by mistake
    pack_manifest(source, out, shard_bytes=3000)
    assert len(written) == len(plan_shards(source, 3000))


def test_bad_images_are_listed_never_packed_and_strict_fails(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    truncated = root / "bottle" / "train" / "good" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    (root / "carpet" / "train" / "good" / "002.png").write_bytes(b"")
    source = manifest_of(root)
    bad = verify_manifest(source)
    assert sorted(uri for uri, _ in bad) == sorted([str(truncated), str(root / "carpet/train/good/002.png")])
    packed = read_manifest(pack_manifest(source, str(tmp_path / "packed")))
    layout = packed_layout(packed)
    assert layout["bad_count"] == 2 and packed.num_rows == source.num_rows - 2
    assert str(truncated) in {uri for uri, _ in layout["bad_files"]}
    assert str(truncated) not in packed.column("image_uri").to_pylist()
    with pytest.raises(ValueError, match="001.png"):
        pack_manifest(source, str(tmp_path / "strict"), strict=True)


def test_a_mask_of_another_size_is_an_error_naming_both_files(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    mask = write_mask(root / "bottle" / "ground_truth" / "broken" / "000_mask.png", size=17)
    image = root / "bottle" / "test" / "broken" / "000.png"
    source = manifest_of(root)
    ((uri, reason),) = verify_manifest(source)
    assert uri == str(image) and str(mask) in reason and str(image) in reason and "17x17" in reason
    # evaluation, prediction and training read through RowReader: it refuses, errors kept or not
    for keep_errors in (True, False):
        with pytest.raises(MaskSizeError, match="000_mask.png.*17x17.*000.png"):
            RowReader(32, 28, keep_errors=keep_errors).read(str(image), str(mask))
    assert RowReader(32, 28).read(str(image)).height == 24  # without its mask the image is fine
    packed = read_manifest(pack_manifest(source, str(tmp_path / "packed")))
    assert packed_layout(packed)["bad_count"] == 1 and str(image) not in packed.column("image_uri").to_pylist()


def _replace_in_shard(shard_uri: str, column: str, row: int, value: bytes) -> None:
    """Overwrite one row's bytes in a shard, keeping its metadata and row groups."""
    shard = pq.read_table(shard_uri)
    values = shard.column(column).to_pylist()
    values[row] = value
    shard = shard.set_column(shard.schema.get_field_index(column), column, pa.array(values, pa.binary()))
    pq.write_table(shard.replace_schema_metadata(shard.schema.metadata), shard_uri, row_group_size=pack.ROWS_PER_GROUP)
    pack._GROUPS.clear()


def _corrupt_one_row(packed: pa.Table) -> str:
    """Truncate the image bytes of the first train row inside its shard; returns its URI."""
    row = packed.filter(pa.compute.equal(packed.column("split"), "train")).slice(0, 1).to_pylist()[0]
    image = pq.read_table(row["shard_uri"], columns=["image_bytes"]).column(0)[row["shard_row"]].as_py()
    _replace_in_shard(row["shard_uri"], "image_bytes", row["shard_row"], image[:30])
    return row["image_uri"]


def test_a_corrupt_image_in_a_shard_is_counted_and_skipped_or_strict_names_it(mvtec_root, tmp_path):
    packed = read_manifest(pack_manifest(manifest_of(mvtec_root), str(tmp_path / "packed")))
    bad = _corrupt_one_row(packed)
    dataset, batches = read_all(packed)
    assert dataset.corrupt.uris == [bad]
    assert sum(len(b.uris) for b in batches) == packed.num_rows - 1
    with pytest.raises(CorruptImageError, match=bad):
        read_all(packed, strict=True)
    from dinomaly.distributed.train.data import decode_batch  # the training map task: same policy

    rows = packed.filter(pa.compute.equal(packed.column("image_uri"), bad)).to_pydict()
    batch = {k: np.asarray(v, dtype=object) for k, v in rows.items()}
    assert len(decode_batch(batch, RowReader(32, 28), None)["image"]) == 0
    with pytest.raises(CorruptImageError, match=bad):
        decode_batch(batch, RowReader(32, 28, keep_errors=False), None)
    assert json.loads(pq.read_schema(packed.column("shard_uri")[0].as_py()).metadata[pack.SHARD_KEY])["rows"] > 0


def test_grouped_permutation_keeps_row_groups_together():
    groups = np.repeat(np.arange(5), [32, 32, 32, 7, 32])
    order = pack.grouped_permutation(groups, seed=1, epoch=0)
    assert sorted(order.tolist()) == list(range(len(groups)))
    runs = groups[order]
    assert (np.diff(runs) != 0).sum() == 4  # each group read as one run
    assert runs[-1] == 3  # the partial group last: chunks of 32 rows line up with full groups
    assert not np.array_equal(order, pack.grouped_permutation(groups, seed=1, epoch=1))


def test_packed_from_s3_gives_the_same_training_batches_as_unpacked(ray_session, moto_s3, demo_root, tmp_path):
    """Packs straight into moto's S3, reads the packed manifest back from s3:// and streams it through the Ray
    Data training pipeline: with fast decoding off and manifest order, the batches equal the unpacked ones."""
    from dinomaly.distributed.train.data import train_dataset

    prefix, local = moto_s3.uri("packed-demo"), shutil.copytree(demo_root, tmp_path / "demo")
    uri = pack_manifest(manifest_of(local), prefix, shard_bytes=40_000)
    assert uri == f"{prefix}/manifest.parquet"
    packed = read_manifest(uri)
    assert all(s.startswith(f"{prefix}/shards/") for s in packed.column("shard_uri").to_pylist())
    config = apply_overrides(Config(model=MODEL), {"data.shuffle": False, "data.fast_decode": False})

    def batches(manifest) -> tuple[list[torch.Tensor], list[str]]:
        # one pass, batched as the trainer's iter_train_batches does (batches of 4, normalised)
        stream = train_dataset(manifest, config, epochs=1).iter_batches(batch_size=4, drop_last=True,
                                                                        batch_format="numpy")
        pairs = [(normalize(b["image"].copy()), list(b["image_uri"])) for b in stream]
        return [images for images, _ in pairs], [u for _, uris in pairs for u in uris]

    reference, reference_uris = batches(unpacked(packed))
    shutil.rmtree(local)  # the packed stream reads its shards, not the files
    images, uris = batches(uri)
    assert uris == reference_uris and len(uris) == 24
    assert all(torch.equal(a, b) for a, b in zip(images, reference, strict=True))


def test_prepare_data_packs_and_verifies(mvtec_root, tmp_path, capsys):
    from pipelines.prepare_data import main

    out = tmp_path / "packed"
    assert main(["--data", str(mvtec_root), "--pack", "--output", str(out), "--shard-mb", "1"]) == 0
    assert "2 shards, 0 bad images left out" in capsys.readouterr().out
    assert is_packed(read_manifest(str(out / "manifest.parquet")))
    write_image(mvtec_root / "bottle" / "test" / "broken" / "000.png", size=30)  # now bigger than its mask
    assert main(["--data", str(mvtec_root), "--verify"]) == 2
    assert "000_mask.png is 24x24 but its image" in capsys.readouterr().out


def test_verify_of_a_packed_manifest_checks_its_shards_not_the_original_files(tmp_path, capsys):
    from pipelines.prepare_data import main

    root = make_mvtec(tmp_path / "mvtec")
    uri = pack_manifest(manifest_of(root), str(tmp_path / "packed"))
    shutil.rmtree(root)  # only the shards hold the images now: nothing is bad
    packed = read_manifest(uri)
    assert verify_manifest(packed) == []
    corrupt = _corrupt_one_row(packed)
    masked = packed.filter(pa.compute.is_valid(packed.column("mask_uri"))).slice(0, 1).to_pylist()[0]
    big_mask = tmp_path / "big_mask.png"
    write_mask(big_mask, size=30)
    _replace_in_shard(masked["shard_uri"], "mask_bytes", masked["shard_row"], big_mask.read_bytes())
    bad = dict(verify_manifest(packed))
    assert set(bad) == {corrupt, masked["image_uri"]}
    assert bad[corrupt].startswith("CorruptImageError") and bad[masked["image_uri"]].startswith("MaskSizeError")
    assert main(["--data", uri, "--verify"]) == 2
    out = capsys.readouterr().out
    assert f"bad: {corrupt}: CorruptImageError" in out and f"verified {packed.num_rows} images: 2 bad" in out
    # a shard that is gone: each of its rows is bad, named with the reason
    pack._GROUPS.clear(), pack._OFFSETS.clear()
    (tmp_path / "packed" / "shards" / "test-00000.parquet").unlink()
    missing = [(uri, reason) for uri, reason in verify_manifest(packed) if uri != corrupt]
    assert len(missing) == packed_layout(packed)["shards"][-1]["rows"]
    assert all("FileNotFoundError" in reason and "test-00000.parquet" in reason for _, reason in missing)


def test_ctrl_c_while_packing_is_one_line_exit_130_and_the_rerun_resumes(mvtec_root, tmp_path, capsys, monkeypatch):
    from pipelines.prepare_data import main

    write, written = pack._write_shard, []

    def interrupted_after_one(table, plan, *args):
        if written:
            raise KeyboardInterrupt
        written.append(plan.name)
        return write(table, plan, *args)

    monkeypatch.setattr(pack, "_write_shard", interrupted_after_one)
    argv = ["--data", str(mvtec_root), "--pack", "--output", str(tmp_path / "out"), "--shard-mb", "1"]
    try:
        assert main(argv) == 130
    except KeyboardInterrupt:  # would end the whole test session
        pytest.fail("Ctrl-C escaped prepare_data.main with its traceback")
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(err) == 1 and "interrupted" in err[0] and "run the same command again to resume" in err[0]
    first = tmp_path / "out" / "shards" / written[0]
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(pack, "_write_shard", write)
    assert main(argv) == 0 and first.stat().st_mtime_ns == stamp


def test_prepare_data_refuses_verify_with_pack_and_speaks_of_shard_size_in_mb(mvtec_root, tmp_path, capsys):
    from pipelines.prepare_data import main

    out = tmp_path / "out"
    assert main(["--data", str(mvtec_root), "--verify", "--pack", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--verify and --pack" in err and "\n" not in err and not out.exists()
    assert main(["--data", str(mvtec_root), "--pack", "--output", str(out), "--shard-mb", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --shard-mb 0 must be a positive number of MB (default 256)")
    assert "shard_bytes" not in err and "\n" not in err and not out.exists()


def test_prepare_data_refuses_flags_its_mode_would_ignore(mvtec_root, tmp_path, capsys):
    from pipelines.prepare_data import main

    out = tmp_path / "m.parquet"
    assert main(["--data", str(mvtec_root), "--verify", "--output", str(out)]) == 2
    assert "drop --output" in capsys.readouterr().err and not out.exists()
    assert main(["--data", str(mvtec_root), "--output", str(out), "--shard-mb", "64"]) == 2
    assert "add --pack, or drop --shard-mb" in capsys.readouterr().err and not out.exists()


def test_each_bad_row_is_printed_once_and_a_long_list_is_cut(tmp_path, capsys, caplog, monkeypatch):
    import pipelines.prepare_data as prepare_data

    root = make_mvtec(tmp_path / "mvtec")
    bad = sorted(root.glob("*/train/good/*.png"))  # 6 images
    for path in bad:
        path.write_bytes(b"")
    monkeypatch.setattr(prepare_data, "SHOWN_BAD", 4)
    caplog.set_level("INFO")
    assert prepare_data.main(["--data", str(root), "--verify"]) == 2
    out = capsys.readouterr().out
    assert sum(str(p) in out for p in bad) == 4 and "... and 2 more\n" in out and "6 bad" in out
    out_dir = tmp_path / "out"
    assert prepare_data.main(["--data", str(root), "--pack", "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("bad (not packed): ") == 4 and all(out.count(f"bad (not packed): {p}:") <= 1 for p in bad)
    assert f"... and 2 more; all under bad_files in the `dinomaly_packed` Parquet metadata of {out_dir}" in out
    assert not [r for r in caplog.records if any(str(p) in r.getMessage() for p in bad)]  # not logged as well
    assert len(packed_layout(read_manifest(str(out_dir / "manifest.parquet")))["bad_files"]) == 6


def test_packing_another_manifest_into_a_folder_warns_of_its_old_shards(tmp_path, caplog):
    root = make_mvtec(tmp_path / "mvtec", classes=("bottle", "carpet", "grid"))
    out, shards = str(tmp_path / "packed"), tmp_path / "packed" / "shards"
    first = read_manifest(pack_manifest(manifest_of(root), out, shard_bytes=4000))
    assert all(s["views"] == {"": s["rows"]} for s in packed_layout(first)["shards"])  # rows without a view
    (shards / "notes.parquet").write_bytes(b"not ours")
    old = {p.name for p in shards.glob("*-*.parquet")}
    caplog.set_level("WARNING", logger="dinomaly.data.pack")
    second = read_manifest(pack_manifest(select(manifest_of(root), categories=["bottle"]), out, shard_bytes=4000))
    used = {uri.rsplit("/", 1)[1] for uri in second.column("shard_uri").unique().to_pylist()}
    stale = old - used
    assert stale and {p.name for p in shards.iterdir()} >= old  # nothing deleted
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{len(stale)} shard files in {shards} are not part of this pack" in warning
    assert all(name in warning for name in stale) and "notes.parquet" not in warning
    caplog.clear()
    pack_manifest(manifest_of(root), out, shard_bytes=4000)  # every old shard in use again: no warning
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
