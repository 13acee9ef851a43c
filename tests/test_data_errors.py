"""The user's own bad files end a job with one line and exit 2, found as early as possible: a wrong-size mask or
an unknown class before Ray starts (a data error inside a training worker would fail every restart in turn), and
a wrong-size mask found in a Ray Data actor pool recognised through the error Ray really raises.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from dinomaly.config import load_config
from dinomaly.data.transforms import MaskSizeError
from dinomaly.distributed.entry import run_job

REPO = Path(__file__).resolve().parent.parent


def bad_mask_dataset(root: Path) -> tuple[Path, Path]:
    """A one-class demo dataset whose first test mask is shrunk to half its image's size: (root, that mask)."""
    from dinomaly.data.demo import generate_demo_dataset

    generate_demo_dataset(root, classes=["nut"], train_per_class=4, test_good_per_class=1, test_defect_per_class=2,
                          size=64)
    mask = sorted((root / "nut" / "ground_truth").rglob("*_mask.png"))[0]
    Image.open(mask).resize((32, 32)).save(mask)
    return root, mask


def demo_config(root: Path, **overrides):
    return load_config("demo", {"data.root": str(root), "train.batch_size": 2, **overrides})


def test_check_before_start_reads_mask_sizes_from_the_headers(tmp_path):
    from dinomaly.distributed.train.run import check_data

    root, mask = bad_mask_dataset(tmp_path / "data")
    with pytest.raises(MaskSizeError, match=rf"mask {mask} is 32x32 but its image .* is 64x64"):
        check_data(demo_config(root))
    Image.open(mask).resize((64, 64)).save(mask)
    check_data(demo_config(root))


def test_unknown_class_or_bad_mask_fails_training_before_ray_starts(tmp_path, monkeypatch, capsys):
    from dinomaly.distributed.train import run as launch

    spec = importlib.util.spec_from_file_location("train_cli_data_errors", REPO / "pipelines" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    started = []
    monkeypatch.setattr(launch, "run", lambda *args, **kwargs: started.append(args))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    root, mask = bad_mask_dataset(tmp_path / "data")
    base = ["--config", "demo", "--data", str(root), "--output", str(tmp_path / "out"), "--set",
            "train.batch_size=2"]
    assert train.main([*base, "--set", "data.categories=[nut,bogus]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err and "classes found: ['nut']" in err
    assert train.main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: mask {mask} is 32x32")
    assert started == []


def test_object_store_rows_are_checked_up_to_a_bound(monkeypatch):
    import pyarrow as pa

    from dinomaly.data import mask_check

    read = []
    monkeypatch.setattr(mask_check, "REMOTE_HEADER_CHECKS", 10)
    monkeypatch.setattr(mask_check, "header_size", lambda uri, data: read.append(uri) or (8, 8))
    remote = [f"s3://b/img/{i}.png" for i in range(100)]
    local = ["/d/a.png", "/d/b.png"]
    table = pa.table({"image_uri": remote + local + ["/d/normal.png"],
                      "mask_uri": [u.replace("img", "mask") for u in remote] + ["/d/mask/a.png", "/d/mask/b.png",
                                                                                None]})
    mask_check.check_mask_sizes(table, load_config("demo").data)
    images = [uri for uri in read if "mask" not in uri]
    assert len(images) == 12 and set(local) <= set(images)  # every local row, 10 of the remote ones
    assert images[:10] == remote[::10] and len(read) == 24


def test_a_wrong_size_mask_from_a_ray_data_actor_pool_is_one_line_and_exit_2(ray_session, tmp_path, capsys):
    """Ray Data wraps the UDF's error in UserCodeException before it is pickled, so the MaskSizeError is no
    longer in the chain the driver gets: entry.py must still find it."""
    import numpy as np
    import ray.data

    from dinomaly.data.manifest import load_manifest, select
    from dinomaly.data.reader import RowReader

    class ReadRows:  # defined here, so it travels by value: the workers cannot import a test module
        def __init__(self):
            self.reader = RowReader(64, 64)

        def __call__(self, batch):  # reads rows with the one reader, as batch scoring does
            rows = list(zip(batch["uri"].tolist(), batch["mask_uri"].tolist()))
            return {"read": np.array([type(one).__name__ for one in self.reader.read_many(rows)])}

    root, mask = bad_mask_dataset(tmp_path / "data")
    test = select(load_manifest(demo_config(root).data), split="test")
    rows = [{"uri": u, "mask_uri": m} for u, m in zip(test.column("image_uri").to_pylist(),
                                                       test.column("mask_uri").to_pylist())]

    def score(_) -> None:
        ray.data.from_items(rows).map_batches(ReadRows, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1),
                                              num_cpus=0.5).materialize()

    assert run_job(lambda: None, score) == 2
    gc.collect()  # a failed execution keeps its actor pool until the dataset is collected
    err = capsys.readouterr().err
    refused = [line for line in err.splitlines() if line.startswith("error:")]
    assert refused == [f"error: mask {mask} is 32x32 but its image {mask.parent.parent.parent / 'test'}"
                       f"/{mask.parent.name}/{mask.name.replace('_mask', '')} is 64x64; a mask must cover its image "
                       "pixel for pixel: re-export the mask at the image's size or fix the mask's file name"]
