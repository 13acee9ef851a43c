"""ManifestDataset and the local batch iterators: reference tensors, corrupt files counted, epochs reshuffled."""

import io

import pytest
import torch
from PIL import Image

from dinomaly.config import DataConfig, DinomalyConfig
from dinomaly.data.dataset import ManifestDataset, infinite_train_batches, iterate_batches
from dinomaly.data.layouts import read_layout
from dinomaly.data.manifest import build_manifest
from dinomaly.data.reader import RowError, RowPixels, RowReader
from dinomaly.data.transforms import CorruptImageError, decode_mask, preprocess_image, preprocess_mask

MODEL = DinomalyConfig(encoder_weights="none", image_size=64, crop_size=56)


@pytest.fixture(scope="module")
def demo_table(demo_root):
    return build_manifest(read_layout(str(demo_root), "mvtec"))


def test_items_are_the_reference_tensors(demo_table):
    test = ManifestDataset(demo_table, MODEL, split="test")
    assert len(test) == 4 * 6
    for image, label, mask, category, uri in (test[i] for i in range(len(test))):
        assert torch.equal(image, preprocess_image(Image.open(uri).convert("RGB"), 64, 56))
        assert mask.shape == (1, 56, 56) and category in uri
        if label:
            mask_uri = uri.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            with open(mask_uri, "rb") as handle:
                assert torch.equal(mask, preprocess_mask(decode_mask(handle.read()), 64, 56))
            assert mask.max() == 1.0
        else:
            assert not mask.any()


def test_evaluation_pass_is_ordered_and_counts_corrupt_files(demo_table, tmp_path):
    rows = demo_table.to_pylist()
    broken = tmp_path / "broken.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    broken.write_bytes(buffer.getvalue()[:50])
    rows[30]["image_uri"] = str(broken)
    dataset = ManifestDataset(rows, MODEL, split="test")
    batches = list(iterate_batches(dataset, batch_size=5))
    uris = [u for b in batches for u in b.uris]
    expected = [r["image_uri"] for r in rows if r["split"] == "test" and r["image_uri"] != str(broken)]
    assert uris == expected and batches[0].images.shape == (5, 3, 56, 56)
    assert dataset.corrupt.count == 1 and dataset.corrupt.uris == [str(broken)]
    strict = ManifestDataset(rows, MODEL, split="test", data_config=DataConfig(strict=True))
    with pytest.raises(CorruptImageError, match="broken.png"):
        list(iterate_batches(strict, batch_size=5))


def test_train_batches_reshuffle_each_epoch_and_follow_the_seed(demo_table):
    dataset = ManifestDataset(demo_table, MODEL, split="train", with_masks=False)
    assert len(dataset) == 24
    stream = infinite_train_batches(dataset, batch_size=8, seed=0)
    epochs = [torch.cat([next(stream) for _ in range(3)]) for _ in range(2)]
    assert all(e.shape == (24, 3, 56, 56) for e in epochs)
    key = lambda images: sorted(map(tuple, images.flatten(1)[:, ::97].tolist()))  # noqa: E731
    assert key(epochs[0]) == key(epochs[1])  # each epoch visits every image once
    assert not torch.equal(epochs[0], epochs[1])  # in a new order
    again = infinite_train_batches(dataset, batch_size=8, seed=0)
    assert torch.equal(next(again), epochs[0][:8])
    ordered = next(infinite_train_batches(dataset, batch_size=8, seed=0, shuffle=False))
    assert torch.equal(ordered, torch.stack([dataset[i][0] for i in range(8)]))


def test_train_batches_stay_full_when_files_are_corrupt(demo_table, tmp_path):
    rows = [r for r in demo_table.to_pylist() if r["split"] == "train"][:10]
    (tmp_path / "empty.png").write_bytes(b"")
    rows[0]["image_uri"] = rows[3]["image_uri"] = str(tmp_path / "empty.png")
    rows[3]["image_uri"] = str(tmp_path / "gone.png")
    dataset = ManifestDataset(rows, MODEL, split="train", with_masks=False)
    stream = infinite_train_batches(dataset, batch_size=4, seed=1, num_workers=1)
    batches = [next(stream) for _ in range(4)]
    assert all(b.shape == (4, 3, 56, 56) for b in batches)
    assert dataset.corrupt.count >= 2 and set(dataset.corrupt.uris) <= {str(tmp_path / "empty.png"),
                                                                        str(tmp_path / "gone.png")}


def test_too_small_or_unreadable_training_sets_fail_clearly(demo_table, tmp_path):
    dataset = ManifestDataset(demo_table, MODEL, split="train")
    with pytest.raises(ValueError, match="fewer than batch_size=32"):
        next(infinite_train_batches(dataset, batch_size=32, seed=0))
    rows = [dict(r, image_uri=str(tmp_path / f"missing{i}.png")) for i, r in
            enumerate(demo_table.to_pylist()) if r["split"] == "train"][:4]
    with pytest.raises(CorruptImageError, match="no readable training image"):
        next(infinite_train_batches(ManifestDataset(rows, MODEL, split="train"), batch_size=2, seed=0))


def test_row_reader_keeps_or_raises_errors_for_images_and_masks(demo_table, tmp_path):
    """One error policy (dinomaly.data.reader): a missing file, an I/O error, corrupt bytes or a broken mask make
    the row an error with its reason, or raise CorruptImageError naming the file when errors are not kept."""
    good = next(r for r in demo_table.to_pylist() if r["split"] == "test" and r["mask_uri"])
    (tmp_path / "broken_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "folder.png").mkdir()
    rows = [(good["image_uri"], good["mask_uri"]), (str(tmp_path / "gone.png"), None),
            (str(tmp_path / "folder.png"), None), (good["image_uri"], str(tmp_path / "broken_mask.png"))]
    reader = RowReader(MODEL.image_size, MODEL.crop_size)
    read = reader.read_many(rows)
    single = reader.read(*rows[0])  # concurrent and one-by-one reads agree
    assert isinstance(read[0], RowPixels) and (read[0].image == single.image).all() and (read[0].mask == single.mask).all()
    assert read[0].image.shape == (56, 56, 3) and read[0].mask.shape == (56, 56) and read[0].mask.max() == 255
    assert [type(r) for r in read[1:]] == [RowError] * 3
    assert read[1].reason.startswith("FileNotFoundError") and read[2].reason.startswith("IsADirectoryError")
    assert "CorruptImageError" in read[3].reason and "broken_mask.png" in read[3].reason
    strict = RowReader(MODEL.image_size, MODEL.crop_size, keep_errors=False)
    for uri, mask_uri in rows[1:]:
        with pytest.raises(CorruptImageError, match=r"unreadable file for image .*\(data\.strict=true\)"):
            strict.read(uri, mask_uri)
    # the local Dataset follows it: the row with the broken mask is skipped and counted, never given a wrong label
    table = [dict(good, image_uri=uri, mask_uri=mask_uri, label=1) for uri, mask_uri in rows]
    dataset = ManifestDataset(table, MODEL, split="test")
    (batch,) = iterate_batches(dataset, batch_size=4)
    assert batch.uris == [good["image_uri"]] and dataset.corrupt.count == 3
