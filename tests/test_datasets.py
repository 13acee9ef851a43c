"""The Ray Data pipeline (dinomaly.distributed.train.data) on a real local Ray cluster and a real S3 server.

Structural-error tests come first and do not start Ray: with every Ray entry point of the module
replaced by a stand-in that fails (`no_ray_work`), they prove the checks run on the driver before any
cluster work. The rest share the session's `ray_session` and `moto_s3`.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from PIL import Image
from torchvision import transforms as T

from dinomaly.config import Config, apply_overrides
from dinomaly.data.layouts import read_layout
from dinomaly.data.manifest import MANIFEST_SCHEMA, build_manifest, write_manifest
from dinomaly.data.reader import RowReader
from dinomaly.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinomaly.distributed.train.data import (
    ErrorCounter,
    StreamPlan,
    count_errors,
    epochs_for,
    iter_train_batches,
    train_dataset,
)
from dinomaly.distributed.train.prefetch import PUT_POLL_S, prefetched

CLASSES = ["weave", "nut"]


def small_config(**overrides) -> Config:
    values = {"model.image_size": 32, "model.crop_size": 28}
    values.update(overrides)
    return apply_overrides(Config(), values)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """Demo data, 2 classes: 6 train, 2 good + 2 defective test images each, 32 px."""
    from dinomaly.data.demo import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("ingest") / "demo", classes=CLASSES, train_per_class=6,
                                 test_good_per_class=2, test_defect_per_class=2, size=32)


@pytest.fixture(scope="module")
def local_manifest(dataset_root):
    return build_manifest(read_layout(str(dataset_root)))


@pytest.fixture(scope="module")
def s3_manifest(dataset_root, moto_s3):
    return build_manifest(read_layout(moto_s3.upload(dataset_root, "ingest/demo")))


def rows(dataset) -> list[dict]:
    """Every row of a dataset, in the order it streams."""
    return [dict(zip(batch, values)) for batch in dataset.iter_batches(batch_size=4, batch_format="numpy")
            for values in zip(*batch.values())]


def uris(dataset) -> list[str]:
    return [u for batch in dataset.iter_batches(batch_size=8, batch_format="numpy") for u in batch["image_uri"]]


# --------------------------------------------------------------------------- structural errors, before Ray


class RayWorkBeforeChecks(AssertionError):
    """Raised by the stand-ins of `no_ray_work`: a dataset builder touched Ray before its checks failed."""


class _NoRay:
    """Stands in for a Ray object: any attribute use (ray.data..., ray.get, Actor.remote) fails."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        raise RayWorkBeforeChecks(f"{self._name}.{attr} was used before the driver-side checks raised")


@pytest.fixture
def no_ray_work(monkeypatch):
    """Any Ray use by dinomaly.distributed.train.data fails, whether or not this process has a cluster up.

    The module's `ray` and its bad-file actor class are replaced, so a dataset, an ErrorCounter actor or
    a cluster query made before a structural check raises RayWorkBeforeChecks instead of the expected
    error; ray.init is replaced too, against an auto-start from anywhere else.
    """
    from dinomaly.distributed.train import data as datasets

    monkeypatch.setattr(datasets, "ray", _NoRay("ray"))
    monkeypatch.setattr(datasets, "_ErrorLog", _NoRay("_ErrorLog"))

    def no_init(*args, **kwargs):
        raise RayWorkBeforeChecks("ray.init was called before the driver-side checks raised")

    monkeypatch.setattr(ray, "init", no_init)


def test_missing_manifest_fails_on_the_driver(no_ray_work, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        train_dataset(str(tmp_path / "absent.parquet"), small_config())


def test_unknown_category_and_empty_class_fail_on_the_driver(no_ray_work, local_manifest):
    with pytest.raises(ValueError, match=r"\['toaster'\] are not in the manifest"):
        train_dataset(local_manifest, small_config(**{"data.categories": ["weave", "toaster"]}))
    no_nut_training = local_manifest.filter(
        pa.compute.invert(pa.compute.and_(pa.compute.equal(local_manifest.column("category"), "nut"),
                                          pa.compute.equal(local_manifest.column("split"), "train"))))
    with pytest.raises(ValueError, match=r"classes \['nut'\] have no train images"):
        train_dataset(no_nut_training, small_config())


def test_missing_root_fails_on_the_driver(no_ray_work, dataset_root, tmp_path):
    moved = shutil.copytree(dataset_root, tmp_path / "copy")
    manifest = build_manifest(read_layout(str(moved)))
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match=str(moved)):
        train_dataset(manifest, small_config())


def test_missing_bucket_and_rejected_credentials_fail_on_the_driver(no_ray_work, s3_manifest, moto_s3):
    elsewhere = s3_manifest.set_column(0, "image_uri", pa.array(
        [u.replace(f"s3://{moto_s3.bucket}/", "s3://missing-bucket/") for u in s3_manifest.column(0).to_pylist()]))
    with pytest.raises(FileNotFoundError, match="bucket s3://missing-bucket"):
        train_dataset(elsewhere, small_config())
    moto_s3.set_auth(True)
    try:
        with pytest.raises(PermissionError, match="denied"):
            train_dataset(s3_manifest, small_config())
    finally:
        moto_s3.set_auth(False)


# --------------------------------------------------------------------------- the pipeline


def test_local_and_s3_give_identical_batches(ray_session, local_manifest, s3_manifest):
    config = small_config()
    # shuffled: Ray streams blocks in completion order, so rows are matched by file
    local, remote = ({r["image_uri"].split("/demo/")[1]: r for r in rows(train_dataset(m, config, epochs=1))}
                     for m in (local_manifest, s3_manifest))
    assert sorted(local) == sorted(remote) and len(local) == 12
    for name, row in local.items():
        np.testing.assert_array_equal(row["image"], remote[name]["image"])
        assert (row["label"], row["category"]) == (remote[name]["label"], remote[name]["category"])


def _odd_images(folder) -> list[dict]:
    """Images in every mode the reference meets (RGB JPEG, L, RGBA, P, 16-bit) + masks of their size."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 340, 3), dtype=np.uint8)
    images = {"rgb.jpg": Image.fromarray(rgb), "gray.png": Image.fromarray(rgb[..., 0]),
              "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
              "palette.png": Image.fromarray(rgb).convert("P"),
              "deep.png": Image.fromarray(rng.integers(0, 400, (300, 340)).astype(np.uint16))}
    mask = np.zeros((300, 340), np.uint8)  # a mask of another size is refused (test_pack.py)
    mask[50:175, 120:300] = 255
    records = []
    for i, (name, image) in enumerate(images.items()):
        image.save(folder / name)
        mask_uri = None
        if i % 2 == 0:
            Image.fromarray(mask).save(folder / f"{name}_mask.png")
            mask_uri = str(folder / f"{name}_mask.png")
        records.append(dict(image_uri=str(folder / name), mask_uri=mask_uri, label=int(mask_uri is not None),
                            category="modes", defect="x" if mask_uri else "good", split="train", sample_id=None,
                            view=None, size_bytes=(folder / name).stat().st_size))
    return records


def test_pipeline_matches_the_reference_transforms(ray_session, tmp_path):
    """Pipeline output, normalised on the trainer, vs torchvision on PIL (the reference composition)."""
    records = _odd_images(tmp_path)
    config = apply_overrides(Config(), {"model.image_size": 448, "model.crop_size": 392, "data.shuffle": False})
    image_ref = T.Compose([T.Resize((448, 448)), T.ToTensor(), T.CenterCrop(392), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    mask_ref = T.Compose([T.Resize((448, 448)), T.CenterCrop(392), T.ToTensor()])
    dataset = train_dataset(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), config, epochs=1)
    assert uris(dataset) == [r["image_uri"] for r in records]
    (images,) = iter_train_batches(dataset, batch_size=len(records), max_passes=1)
    expected = torch.stack([image_ref(Image.open(r["image_uri"]).convert("RGB")) for r in records])
    image_diff = (images - expected).abs().max().item()
    assert image_diff == 0.0, f"max abs diff {image_diff}"
    # masks (read for evaluation by the same reader)
    reader = RowReader(448, 392)
    for record in (r for r in records if r["mask_uri"]):
        got = torch.from_numpy(reader.read(record["image_uri"], record["mask_uri"]).mask).float().div(255)
        assert (got - mask_ref(Image.open(record["mask_uri"]))[0]).abs().max().item() == 0.0


RESHUFFLE_IMAGES = 64
SHARED_PAIRS_LIMIT = RESHUFFLE_IMAGES // 4


@pytest.fixture(scope="module")
def many_images_manifest(dataset_root, tmp_path_factory) -> pa.Table:
    """64 training rows of one class: copies of one demo image under distinct names (only the order matters)."""
    folder = tmp_path_factory.mktemp("many")
    source = sorted((dataset_root / "weave" / "train" / "good").iterdir())[0]
    records = []
    for i in range(RESHUFFLE_IMAGES):
        target = shutil.copyfile(source, folder / f"{i:03d}.png")
        records.append(dict(image_uri=str(target), mask_uri=None, label=0, category="weave", defect="good",
                            split="train", sample_id=None, view=None, size_bytes=target.stat().st_size))
    return pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA)


def adjacent_pairs(streams: list[list[str]]) -> set[tuple[str, str]]:
    """Every (uri, next uri) pair of the streams: the part of an order that block and shard scheduling keep."""
    return {pair for stream in streams for pair in zip(stream, stream[1:])}


def uris_by_epoch(shard) -> dict[int, list[str]]:
    """One pass over a shard: its URIs in stream order, per epoch column."""
    seen: dict[int, list[str]] = {}
    for batch in shard.iter_batches(batch_size=8, batch_format="numpy"):
        for uri, epoch in zip(batch["image_uri"], batch["epoch"]):
            seen.setdefault(int(epoch), []).append(uri)
    return seen


def test_streaming_split_gives_disjoint_covering_shards_reshuffled_each_epoch(ray_session, many_images_manifest):
    """Two consumers, two epochs in one stream: each epoch covers the class once, in a new permutation.

    Plain inequality of the orders would prove nothing: blocks stream in completion order and go to
    whichever consumer asks, so even a repeated (or absent) permutation comes out in a varying order.
    What scheduling cannot change is the order inside a block (8 read tasks of 8 rows per epoch), so a
    repeated permutation shares most of its 62 adjacent (uri, next uri) pairs (56 lie inside blocks)
    with the previous epoch, and no shuffle shares as many with the manifest order. Two independent
    uniform permutations of 64 rows share a given adjacent pair with probability 1/64, on average less
    than one of 62; sharing 16 or more has a probability of about C(62, 16) / 64**16 = 3.5e-15 per
    comparison (three comparisons here).
    """
    manifest_order = many_images_manifest.column("image_uri").to_pylist()
    dataset = train_dataset(many_images_manifest, small_config(), epochs=2)
    shards = dataset.streaming_split(2, equal=True)
    seen: dict[int, dict[int, list[str]]] = {}

    def consume(rank: int) -> None:  # one pass holds both epochs, as a Train worker reads it
        seen[rank] = uris_by_epoch(shards[rank])

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(seen) == [0, 1], "a consumer did not finish its pass"
    assert [sum(len(u) for u in seen[rank].values()) for rank in (0, 1)] == [RESHUFFLE_IMAGES] * 2
    for epoch in (0, 1):
        first, second = seen[0].get(epoch, []), seen[1].get(epoch, [])
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(manifest_order)
    pairs = [adjacent_pairs([seen[0].get(epoch, []), seen[1].get(epoch, [])]) for epoch in (0, 1)]
    unshuffled = adjacent_pairs([manifest_order])
    for epoch in (0, 1):
        shared = len(pairs[epoch] & unshuffled)
        assert shared < SHARED_PAIRS_LIMIT, f"epoch {epoch} keeps {shared} adjacent pairs of the manifest order"
    shared = len(pairs[0] & pairs[1])
    assert shared < SHARED_PAIRS_LIMIT, f"the second epoch repeats {shared} adjacent pairs of the first"


def test_stream_plan_covers_every_epoch_once_in_a_fresh_order():
    plan = StreamPlan(rows=[None], num_rows=10, per_block=4, epochs=3, seed=7)
    assert (plan.chunks, plan.tasks) == (3, 9)
    epochs: dict[int, list[int]] = {}
    for task in range(plan.tasks):
        epoch, indices = plan.task_rows(task)
        epochs.setdefault(epoch, []).extend(indices.tolist())
    assert sorted(epochs) == [0, 1, 2] and all(sorted(order) == list(range(10)) for order in epochs.values())
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(10))
    ordered = StreamPlan(rows=[None], num_rows=10, per_block=4, epochs=2, seed=None)
    assert [i for task in range(ordered.tasks) for i in ordered.task_rows(task)[1].tolist()] == list(range(10)) * 2


def test_epochs_for_covers_the_run_with_one_epoch_to_spare():
    config = small_config(**{"train.total_steps": 300, "train.batch_size": 8, "train.warmup_steps": 10})
    assert epochs_for(config, 160) == 16  # 2,400 images = 15 epochs of 160, + 1 for skipped files
    assert epochs_for(config, 100_000) == 2


def test_prefetched_runs_ahead_and_reraises_and_stops_on_close():
    made: list[int] = []

    def numbers():
        for i in range(100):
            made.append(i)
            yield i

    stream = prefetched(numbers(), depth=3)
    time.sleep(0.3)
    assert 3 <= len(made) <= 4  # started before the first next(): the queue's 3, and one waiting to be put
    assert next(stream) == 0
    time.sleep(0.3)
    assert 4 <= len(made) <= 5  # one more once the consumer took one; never the whole source
    stream.close()
    time.sleep(3 * PUT_POLL_S)
    assert not any(t.name == "dinomaly-prefetch" for t in threading.enumerate())

    def failing():
        yield 1
        raise OSError("bucket gone")

    stream = prefetched(failing(), depth=2)
    assert next(stream) == 1
    with pytest.raises(OSError, match="bucket gone"):
        next(stream)


def test_one_pass_streams_every_epoch_without_a_restart(ray_session, local_manifest):
    """The epochs of a run follow each other in one execution (no pipeline restart at an epoch boundary):
    one pass gives every epoch's batches, and the epochs arrive in order with manifest order inside."""
    dataset = train_dataset(local_manifest, small_config(**{"data.shuffle": False}), epochs=3)
    batches = list(iter_train_batches(dataset, batch_size=4, max_passes=1))
    assert len(batches) == 3 * 12 // 4
    epochs = [int(e) for b in dataset.iter_batches(batch_size=12, batch_format="numpy") for e in b["epoch"]]
    assert epochs == [0] * 12 + [1] * 12 + [2] * 12
    torch.testing.assert_close(batches[0], batches[3], rtol=0, atol=0)  # epoch 1 starts as epoch 0 did


def test_iter_train_batches_yields_normalised_full_batches(ray_session, local_manifest):
    config = small_config(**{"data.shuffle": False})
    dataset = train_dataset(local_manifest, config, epochs=1)
    batches = list(iter_train_batches(dataset, batch_size=5, max_passes=2))
    assert len(batches) == 2 * (12 // 5)  # the partial batch of each pass is dropped
    assert all(b.shape == (5, 3, 28, 28) and b.dtype == torch.float32 for b in batches)
    torch.testing.assert_close(batches[0], batches[2], rtol=0, atol=0)  # shuffle off: manifest order repeats
    train_rows = local_manifest.filter(pa.compute.equal(local_manifest.column("split"), "train"))
    assert uris(dataset) == train_rows.column("image_uri").to_pylist()


def _corrupt(root, manifest) -> list[str]:
    """Break three training images (zero-byte, truncated, not an image) and remove a fourth."""
    train = [u for u, s in zip(manifest.column("image_uri").to_pylist(), manifest.column("split").to_pylist())
             if s == "train"]
    with open(train[0], "wb"):
        pass
    data = open(train[1], "rb").read()
    open(train[1], "wb").write(data[: len(data) // 2])
    open(train[2], "w").write("this is not an image")
    os.remove(train[3])
    return train[:4]


def test_corrupt_files_are_skipped_logged_and_counted(ray_session, dataset_root, tmp_path):
    root = shutil.copytree(dataset_root, tmp_path / "broken")
    manifest = build_manifest(read_layout(str(root)))
    bad = _corrupt(root, manifest)
    errors = ErrorCounter()
    train = train_dataset(manifest, small_config(), errors=errors, epochs=1)
    assert len(uris(train)) == 12 - 4
    assert count_errors(train) == errors.summary()
    summary = errors.summary()
    assert summary["data_errors"] == 4
    assert sorted(uri for uri, _ in summary["error_files"]) == sorted(bad)
    reasons = dict(summary["error_files"])
    assert "empty file" in reasons[bad[0]] and "cannot decode" in reasons[bad[2]]
    assert reasons[bad[3]].startswith("FileNotFoundError")


def test_strict_mode_fails_on_the_first_corrupt_file(ray_session, dataset_root, tmp_path):
    root = shutil.copytree(dataset_root, tmp_path / "broken")
    manifest = build_manifest(read_layout(str(root)))
    bad = _corrupt(root, manifest)
    dataset = train_dataset(manifest, small_config(**{"data.strict": True, "data.shuffle": False}), epochs=1)
    # Ray Data wraps the map task's CorruptImageError in UserCodeException (as RayTaskError(UserCodeException));
    # the original type and message survive only in the text
    with pytest.raises(ray.exceptions.UserCodeException,
                       match=r"CorruptImageError: unreadable file for image .* \(data\.strict=true\)") as info:
        uris(dataset)
    assert any(uri in str(info.value) for uri in bad)  # blocks run in parallel: any bad training file


def test_manifest_uri_on_s3_is_read(ray_session, s3_manifest, moto_s3):
    uri = write_manifest(s3_manifest, moto_s3.uri("ingest/manifest.parquet"))
    dataset = train_dataset(uri, small_config(**{"data.categories": ["nut"], "data.shuffle": False}), epochs=1)
    assert [u.split("/demo/")[1] for u in uris(dataset)] == [
        u.split("/demo/")[1] for u, s, c in zip(*(s3_manifest.column(n).to_pylist() for n in ("image_uri", "split", "category")))
        if s == "train" and c == "nut"]


def test_decode_tasks_follow_the_measured_decode_rate(ray_session, local_manifest):
    from dinomaly.data.reader import RowReader as Reader
    from dinomaly.distributed.train.data import decode_concurrency, measure_decode_s

    columns = local_manifest.filter(pa.compute.equal(local_manifest.column("split"), "train"))
    reader = Reader(32, 28)
    seconds = measure_decode_s(columns, reader)
    assert 0 < seconds < 1
    workers = {"train.num_workers": 1, "train.cpus_per_worker": 1.0}
    free = int(ray.cluster_resources()["CPU"]) - 1
    assert decode_concurrency(columns, reader, small_config(**workers)) is None  # 0: Ray Data's own choice
    assert decode_concurrency(columns, reader, small_config(**workers, **{"data.decode_images_per_s": 0.01})) == 1
    assert decode_concurrency(columns, reader, small_config(**workers, **{"data.decode_images_per_s": 1e9})) == free


def test_data_wait_share_with_and_without_the_start_up():
    from dinomaly.distributed.train.progress import data_wait, data_wait_line
    from dinomaly.distributed.train.worker import WorkerLog

    assert data_wait(None) is None and data_wait(WorkerLog(start_step=0)) is None
    # 11 steps of 1 s compute; the first waited 5 s for the pipeline, the others 0.05 s each
    waits = [5.0] + [0.05] * 10
    log = WorkerLog(start_step=0, data_wait_s=sum(waits), train_s=11 + sum(waits), step_waits=waits)
    figures = data_wait(log)
    assert figures["share"] == pytest.approx(5.5 / 16.5)
    assert figures["steady_share"] == pytest.approx(0.5 / 10.5)
    assert figures["first_wait_s"] == 5.0 and figures["median_wait_ms"] == pytest.approx(50)
    assert data_wait_line(figures).startswith("data wait 4.8 % of step time")
