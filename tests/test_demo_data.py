"""The demo generator: exact MVTec layout, byte-identical for a seed, masks exactly where defects changed pixels."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinomaly.data.demo import (
    DEFECTS,
    DEMO_CLASSES,
    RENDERERS,
    apply_defect,
    generate_demo_dataset,
    sample_rng,
)
from dinomaly.data.layouts import read_layout

SMALL = dict(train_per_class=3, test_good_per_class=2, test_defect_per_class=3, size=48)


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_demo_is_an_mvtec_layout_with_every_class_and_defect(demo_root):
    records = read_layout(str(demo_root), "auto")
    assert sorted({r.category for r in records}) == sorted(DEMO_CLASSES)
    for cls in DEMO_CLASSES:
        mine = [r for r in records if r.category == cls]
        assert sum(r.split == "train" for r in mine) == 6
        assert sum(r.split == "test" and r.label == 0 for r in mine) == 3
        assert sorted(r.defect for r in mine if r.label) == sorted(DEFECTS[cls])
    image = load(Path(records[0].image_uri))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_same_seed_gives_byte_identical_files_and_other_seeds_differ(tmp_path):
    a = digest(generate_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = digest(generate_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = digest(generate_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b and len(a) == 4 * (3 + 2 + 3 + 3)
    assert all(a[k] != c[k] for k in a)
    subset = digest(generate_demo_dataset(tmp_path / "d", classes=["pill"], seed=3, **SMALL))
    assert subset == {k: v for k, v in a.items() if k.startswith("pill/")}


def test_saved_masks_are_exactly_the_changed_pixels(demo_root):
    """Re-render the clean image from the same RNG stream and diff it against the saved defective file."""
    for cls in DEMO_CLASSES:
        for i in range(3):
            defect = DEFECTS[cls][i % 3]
            clean = RENDERERS[cls](sample_rng(0, cls, "test_defect", i), 64).image
            image = load(demo_root / cls / "test" / defect / f"{i // 3:03d}.png")
            mask = load(demo_root / cls / "ground_truth" / defect / f"{i // 3:03d}_mask.png")
            assert set(np.unique(mask)) == {0, 255}
            changed = (image != clean).any(-1)
            assert np.array_equal(changed, mask == 255), (cls, defect)
            assert 4 <= changed.sum() <= 0.1 * 64 * 64


@pytest.mark.parametrize("cls", DEMO_CLASSES)
def test_defects_are_strong_and_inside_the_centre_crop(cls):
    for index, defect in enumerate(DEFECTS[cls] * 3):
        rng = sample_rng(7, cls, "test_defect", index)
        render = RENDERERS[cls](rng, 128)
        image, mask = apply_defect(render, defect, rng)
        assert np.array_equal((image != render.image).any(-1), mask)
        contrast = np.abs(image.astype(int) - render.image.astype(int))[mask].max(-1).mean()
        assert contrast > 40, (defect, contrast)  # clearly visible, not a faint texture change
        ys, xs = np.nonzero(mask)
        assert ys.min() >= 8 and xs.min() >= 8 and ys.max() < 120 and xs.max() < 120  # survives 128 -> 112 crop


def test_rerun_is_a_no_op_and_foreign_folders_are_refused(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", **SMALL)
    before = digest(root)
    assert digest(generate_demo_dataset(root, **SMALL)) == before
    smaller = dict(SMALL, train_per_class=2)
    assert len(digest(generate_demo_dataset(root, **smaller))) == len(before) - 4  # stale files removed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        generate_demo_dataset(tmp_path / "mine", **SMALL)
    with pytest.raises(ValueError, match="unknown demo classes"):
        generate_demo_dataset(tmp_path / "x", classes=["carpet"])
