"""Bulk scoring of unlabelled images (a folder, an s3:// prefix or a manifest) into Parquet, resumable.

A packed manifest (dinomaly.data.pack) is read from its shards; its rows are still known by image_uri.

Output location (folder or s3:// prefix):
    results/part-<run>-<n>.parquet  one row per input image (RESULT_SCHEMA), written every `rows_per_file`
                             rows; read it all with pandas.read_parquet("<output>/results") or Ray Data
    heatmaps/<stem>-<hash>.png  overlays, when asked (dinomaly.heatmap: colours 0 .. 2 x threshold)
    run.json                 model source, threshold, preprocessing and heatmap setting of the results
    summary.json             counts, anomaly rate, images/s of the latest run
    .incomplete/             local outputs only: files being written, renamed into place when complete
A re-run on the same output skips every uri already in a part file (error rows included: an unreadable
file stays unreadable), so a killed run loses at most the rows not yet flushed. Every file appears whole
(a local file is written under .incomplete/ and renamed; an object-store put is atomic), so the output
stays readable whenever the run is killed; the next run removes what a killed one left in .incomplete/.
Reusing an output made with another model or threshold is refused unless it is overwritten.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dinomaly.calibration import ClassThreshold, ThresholdTable
from dinomaly.config import Config
from dinomaly.config.cli import set_keys
from dinomaly.data.records import is_image
from dinomaly.data.storage import StorageOptions, filesystem_for, list_files, split_uri
from dinomaly.distributed.batch.scoring import ModelBundle, ScoreSpec, decision_columns, score_rows

logger = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("score", pa.float32()),  # raw image score; null on error
    pa.field("class", pa.string(), nullable=False),  # whose threshold decided: the manifest's class, or 'global'
    pa.field("threshold", pa.float32(), nullable=False),
    pa.field("is_anomalous", pa.bool_()),  # score >= threshold; null on error
    pa.field("normalised_score", pa.float32()),  # score / threshold: 1.0 = the boundary; null on error
    pa.field("peak_row", pa.float32()),  # centroid of the top-1% map pixels, ORIGINAL image pixels
    pa.field("peak_col", pa.float32()),
    pa.field("peak_row_map", pa.float32()),  # the same in final-map pixels (eval.resize x eval.resize)
    pa.field("peak_col_map", pa.float32()),
    pa.field("height", pa.int32()),  # original image size; null on error
    pa.field("width", pa.int32()),
    pa.field("heatmap_uri", pa.string()),  # null when not asked or on error
    pa.field("error", pa.string()),  # null = scored
])
RUN_FILE, SUMMARY_FILE, HEATMAP_DIR, RESULTS_DIR = "run.json", "summary.json", "heatmaps", "results"
# Beside results/, not in it: a reader of results/ (pyarrow, pandas, Ray Data) never meets a half-written part,
# and the leading '.' hides it from dataset discovery over the whole output too.
INCOMPLETE_DIR = ".incomplete"


def _by_uri(input_uri: str, config: Config, *wanted: tuple[str, ...]) -> dict[str, tuple]:
    """uri -> the values of the first present column of each `wanted` group, from a Parquet input; {} for a
    folder, or when a group has no column there."""
    if not input_uri.endswith(".parquet"):
        return {}
    fs, path = filesystem_for(input_uri, config.data)
    names = pq.read_schema(path, filesystem=fs).names
    columns = [next((c for c in group if c in names), None) for group in (("image_uri", "uri"), *wanted)]
    if None in columns:
        return {}
    table = pq.read_table(path, filesystem=fs, columns=columns)
    uris, *values = (table.column(c).to_pylist() for c in columns)
    return dict(zip(uris, zip(*values)))


def list_classes(input_uri: str, config: Config) -> dict[str, str]:
    """uri -> class from a manifest's category (or class) column; {} for a folder or a list without one."""
    return {uri: category for uri, (category,) in _by_uri(input_uri, config, ("category", "class")).items()}


def list_shards(input_uri: str, config: Config) -> dict[str, tuple[str, int]]:
    """uri -> (shard_uri, shard_row) of a packed manifest (dinomaly.data.pack), whose images are read from its
    shards, not from their original files; {} for anything else."""
    return {uri: (shard, int(row)) for uri, (shard, row)
            in _by_uri(input_uri, config, ("shard_uri",), ("shard_row",)).items()}


def list_inputs(input_uri: str, config: Config) -> list[str]:
    """Image URIs: every image file under a folder / prefix (by extension), or a Parquet's image_uri/uri column."""
    if input_uri.endswith(".parquet"):
        fs, path = filesystem_for(input_uri, config.data)
        table = pq.read_table(path, filesystem=fs)
        column = next((c for c in ("image_uri", "uri") if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{input_uri} has no image_uri or uri column (columns: {table.column_names}); "
                             "pass a manifest from pipelines/prepare_data.py or a Parquet list of URIs")
        return list(dict.fromkeys(table.column(column).to_pylist()))
    files = list_files(input_uri, data_config=config.data)  # a folder has no classes: the global threshold
    images = [uri for uri in files if is_image(uri.rsplit("/", 1)[-1])]
    if len(images) < len(files):
        logger.info("%d files under %s are not images by extension and are not scored", len(files) - len(images),
                    input_uri)
    if not files:
        raise FileNotFoundError(f"{input_uri} does not exist or holds no files; check the path (or pass a manifest)")
    if not images:
        raise FileNotFoundError(f"no image files under {input_uri} ({len(files)} files, none with an image extension); "
                                "check the path (or pass a manifest)")
    return images


class OutputStore:
    """The result location: Parquet parts, run.json, summary.json and heatmaps under one folder or prefix."""

    def __init__(self, uri: str, config: Config):
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem_for(self.uri, config.data)
        self.is_local = not split_uri(self.uri)[0]

    @property
    def incomplete(self) -> str:
        """Where local files are written before they are renamed into place ('' for an object store)."""
        return f"{self.path}/{INCOMPLETE_DIR}" if self.is_local else ""

    def _files(self) -> list[pafs.FileInfo]:
        """The output's files, without the unfinished ones of a killed run."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File
                and not (self.incomplete and i.path.startswith(f"{self.incomplete}/"))]

    def discard_incomplete(self) -> None:
        """Delete what a killed run left half-written: .incomplete/, and results/*.tmp of earlier versions."""
        if not self.is_local:
            return
        if self.fs.get_file_info(self.incomplete).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.incomplete)
        for info in self.fs.get_file_info(pafs.FileSelector(f"{self.path}/{RESULTS_DIR}", allow_not_found=True)):
            if info.type == pafs.FileType.File and info.base_name.endswith(".tmp"):
                self.fs.delete_file(info.path)

    def exists(self) -> bool:
        return bool(self._files())

    def parts(self) -> list[str]:
        return sorted(i.path for i in self._files() if i.path.startswith(f"{self.path}/{RESULTS_DIR}/part-")
                      and i.base_name.endswith(".parquet"))

    def clear(self) -> None:
        self.fs.delete_dir_contents(self.path, missing_dir_ok=True)

    def results(self, columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(p, filesystem=self.fs, columns=columns) for p in self.parts()]
        schema = RESULT_SCHEMA if columns is None else pa.schema([RESULT_SCHEMA.field(c) for c in columns])
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = f"{self.path}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.readall())

    def write_json(self, name: str, value: dict[str, Any]) -> None:
        self._write(f"{self.path}/{name}", lambda path: self._put(path, json.dumps(value, indent=1).encode()))

    def write_part(self, table: pa.Table, name: str) -> None:
        self._write(f"{self.path}/{RESULTS_DIR}/{name}", lambda path: pq.write_table(table, path, filesystem=self.fs))

    def _put(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def _write(self, path: str, writer) -> None:
        """Local: write under .incomplete/, then rename into place (a kill never leaves half a file where
        readers look). Object-store puts are atomic: written in place."""
        if not self.is_local:
            writer(path)
            return
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.fs.create_dir(self.incomplete, recursive=True)
        temporary = f"{self.incomplete}/{uuid.uuid4().hex[:8]}-{path.rsplit('/', 1)[-1]}"
        writer(temporary)
        self.fs.move(temporary, path)


def prepare_output(store: OutputStore, run: dict[str, Any], overwrite: bool) -> set[str]:
    """Clear (overwrite) or check an existing output; returns the uris already scored there."""
    if overwrite:
        store.clear()
    elif store.exists():
        previous = store.read_json(RUN_FILE)
        if previous is not None and previous != run:
            changed = {k: (previous.get(k), v) for k, v in run.items() if previous.get(k) != v}
            raise ValueError(f"{store.uri} holds results of another run ({changed} as (before, now)); pass "
                             "--overwrite to replace them, or choose another --output")
        if previous is None and not store.parts():
            raise ValueError(f"{store.uri} exists and is not a predict output; pass --overwrite to clear it, or "
                             "choose another --output")
    store.discard_incomplete()  # only now: a folder that is not ours was refused above, untouched
    store.write_json(RUN_FILE, run)
    return set(store.results(["uri"]).column("uri").to_pylist())


def _result_rows(batch: dict[str, np.ndarray], thresholds: ThresholdTable) -> pa.Table:
    ok = batch["error"] == ""
    scores = batch["score"]
    classes = batch["category"].tolist() if "category" in batch else [None] * len(ok)

    def masked(values, dtype):
        return pa.array(values, type=dtype, mask=~ok)

    return pa.table({
        "uri": pa.array(batch["uri"].tolist(), pa.string()),
        "score": masked(scores, pa.float32()),
        **decision_columns(scores, classes, thresholds, ok),
        **{k: masked(batch[k], pa.float32()) for k in ("peak_row", "peak_col", "peak_row_map", "peak_col_map")},
        "height": masked(batch["height"], pa.int32()), "width": masked(batch["width"], pa.int32()),
        "heatmap_uri": pa.array([h or None for h in batch["heatmap_uri"].tolist()], pa.string()),
        "error": pa.array([e or None for e in batch["error"].tolist()], pa.string()),
    }, schema=RESULT_SCHEMA)


@dataclass
class PredictSummary:
    """Counts of this run and of the whole output; what the pipeline prints and writes to summary.json."""

    output: str
    inputs: int
    skipped: int  # already in the output from an earlier run
    scored: int  # this run, readable
    errors: int  # this run, unreadable
    anomalous: int  # this run
    seconds: float
    total_rows: int  # the whole output after this run
    total_errors: int
    total_anomalous: int

    @property
    def images_per_s(self) -> float:
        done = self.scored + self.errors
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def anomaly_rate(self) -> float:
        scored = self.total_rows - self.total_errors
        return self.total_anomalous / scored if scored else float("nan")

    def as_dict(self) -> dict[str, Any]:
        rate = self.anomaly_rate
        return {**asdict(self), "images_per_s": self.images_per_s, "anomaly_rate": rate if rate == rate else None}


def predict(bundle_ref, bundle: ModelBundle, config: Config, inputs: list[str], output_uri: str,
            threshold: float | ThresholdTable, heatmaps: bool = False, overwrite: bool = False,
            rows_per_file: int = 2000, progress: bool = False, classes: dict[str, str] | None = None,
            shards: dict[str, tuple[str, int]] | None = None) -> PredictSummary:
    """Score `inputs` that are not yet in `output_uri`; write Parquet parts as results stream in.

    threshold: the model's thresholds (a number = one global threshold); classes: uri -> class, whose
    threshold then decides (a class the table lacks, or no class, uses the global threshold); shards: uri ->
    (shard_uri, shard_row) of a packed manifest (list_shards): those images are read from their shards."""
    from dinomaly.distributed.resources import wait_for_batch_resources
    wait_for_batch_resources(config, "predict")  # the actor pool's CPUs/GPUs, within cluster.start_timeout_s
    table = threshold if isinstance(threshold, ThresholdTable) else ThresholdTable(ClassThreshold(threshold, "given"))
    store = OutputStore(output_uri, config)
    sizes = {"image_size": config.model.image_size, "crop_size": config.model.crop_size, "resize": config.eval.resize}
    run = {"model": bundle.source, "model_version": bundle.version, "thresholds": table.to_dict(),
           "heatmaps": heatmaps, "preprocessing": sizes}  # rows scored at other sizes must not join these
    done = prepare_output(store, run, overwrite)
    todo = [uri for uri in inputs if uri not in done]
    logger.info("%d images to score, %d already in %s", len(todo), len(inputs) - len(todo), store.uri)
    spec = ScoreSpec(keep_maps=False, storage=StorageOptions.resolve(config.data),
                     heatmap_uri=f"{store.uri}/{HEATMAP_DIR}" if heatmaps else "", staging_dir=store.incomplete,
                     heatmap_thresholds=table)
    counts = {"scored": 0, "errors": 0, "anomalous": 0}
    start, run_id = time.perf_counter(), f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if todo:
        rows = {"uri": pa.array(todo, pa.string())}
        if classes:
            rows["category"] = pa.array([classes.get(uri) for uri in todo], pa.string())
        if shards:  # results stay keyed by image uri; only the bytes come from the shards
            located = [shards[uri] for uri in todo]
            rows["shard_uri"] = pa.array([shard for shard, _ in located], pa.string())
            rows["shard_row"] = pa.array([row for _, row in located], pa.int32())
        dataset = score_rows(pa.table(rows), bundle_ref, config, spec, with_masks=False)
        _stream(dataset, store, table, counts, run_id, rows_per_file, len(todo), progress)
    totals = store.results(["error", "is_anomalous"])
    result = PredictSummary(
        output=store.uri, inputs=len(inputs), skipped=len(inputs) - len(todo), seconds=time.perf_counter() - start,
        total_rows=totals.num_rows, total_errors=int(pc.count(totals.column("error")).as_py()),
        total_anomalous=int(pc.sum(totals.column("is_anomalous")).as_py() or 0), **counts)
    store.write_json(SUMMARY_FILE, result.as_dict())
    store.discard_incomplete()  # empty by now: leave no staging folder in a finished output
    return result


def _stream(dataset, store: OutputStore, thresholds: ThresholdTable, counts: dict[str, int], run_id: str,
            rows_per_file: int, total: int, progress: bool) -> None:
    from tqdm import tqdm

    pending: list[pa.Table] = []
    pending_rows = part = 0
    with tqdm(total=total, unit="img", disable=not progress, desc="scoring") as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows = _result_rows(batch, thresholds)
            errors = int(pc.count(rows.column("error")).as_py())
            counts["errors"] += errors
            counts["scored"] += rows.num_rows - errors
            counts["anomalous"] += int(pc.sum(rows.column("is_anomalous")).as_py() or 0)
            pending.append(rows)
            pending_rows += rows.num_rows
            bar.update(rows.num_rows)
            if pending_rows >= rows_per_file:
                store.write_part(pa.concat_tables(pending), f"part-{run_id}-{part:05d}.parquet")
                pending, pending_rows, part = [], 0, part + 1
        if pending:
            store.write_part(pa.concat_tables(pending), f"part-{run_id}-{part:05d}.parquet")


# --------------------------------------------------------------------------- the job as the entry point runs it


@dataclass
class PredictJob:
    """A checked bulk-scoring job: the model, its thresholds (each saying where it came from), the inputs
    and their classes (uri -> class, from a manifest)."""

    bundle: ModelBundle
    thresholds: ThresholdTable
    inputs: list[str]
    classes: dict[str, str]
    shards: dict[str, tuple[str, int]] = field(default_factory=dict)  # a packed manifest's: uri -> (shard, row)


def prepare(model: str, input_uri: str, preset: str | None, overrides: list[str], threshold: float | None,
            rows_per_file: int) -> PredictJob:
    """Everything checked before any Ray work; ValueError/OSError name the fix."""
    from dinomaly.distributed.batch.scoring import load_bundle
    from dinomaly.serving_api import resolve_thresholds

    if rows_per_file < 1:
        raise ValueError(f"--rows-per-file {rows_per_file} must be at least 1")
    bundle = load_bundle(model, preset, overrides)
    if threshold is not None:  # typed by the user: it decides every row, the model's class table set aside
        table = ThresholdTable(ClassThreshold(float(threshold), "--threshold"))
    else:
        try:
            table = resolve_thresholds(None, bundle.config.serve.threshold_method, bundle.metadata, bundle.tags)
        except ValueError as err:
            raise ValueError(f"{err} (pass --threshold)") from err
    inputs = list_inputs(input_uri, bundle.config)
    classes = list_classes(input_uri, bundle.config)
    if "data.categories" in set_keys(overrides) and (wanted := bundle.config.data.categories):
        found = sorted({c for c in classes.values() if c is not None})  # a folder has no classes
        if missing := [c for c in wanted if c not in found]:
            raise ValueError(f"data.categories {missing} are not in {input_uri} (its classes: "
                             f"{found or 'none: no category column'}); name classes it has, or drop data.categories")
        inputs = [uri for uri in inputs if classes.get(uri) in wanted]
        classes = {uri: classes[uri] for uri in inputs}
    unknown = sorted({c for c in classes.values() if c is not None} - set(table.classes))
    if unknown and threshold is None:
        logger.warning("classes %s have no threshold of their own in this model (it knows %s); their images are "
                       "decided by the global threshold", unknown, sorted(table.classes) or "none")
    if shards := list_shards(input_uri, bundle.config):
        logger.info("%s is packed: its images are read from its %d shards", input_uri,
                    len({shard for shard, _ in shards.values()}))
    return PredictJob(bundle, table, inputs, classes, shards)


def run(job: PredictJob, output_uri: str, *, heatmaps: bool = False, overwrite: bool = False,
        rows_per_file: int = 2000) -> PredictSummary:
    """Start or join Ray (and stop a Ray it started), score, print the summary line."""
    import sys

    import ray

    from dinomaly.distributed.cluster import ensure_ray
    from dinomaly.distributed.entry import UsageError

    started = ensure_ray()
    try:
        summary = predict(ray.put(job.bundle), job.bundle, job.bundle.config, job.inputs, output_uri,
                          job.thresholds, heatmaps=heatmaps, overwrite=overwrite, rows_per_file=rows_per_file,
                          progress=sys.stderr.isatty(), classes=job.classes, shards=job.shards)
    except ValueError as err:  # an output of another run without --overwrite
        raise UsageError(str(err)) from err
    finally:
        if started:
            ray.shutdown()
    used = job.thresholds.global_threshold
    rate = f"{summary.anomaly_rate:.1%}" if summary.anomaly_rate == summary.anomaly_rate else "n/a"
    print(f"{summary.inputs} images: {summary.skipped} already scored, {summary.scored} scored and {summary.errors} "
          f"unreadable now ({summary.images_per_s:.1f} images/s); global threshold {used.threshold:.6g} "
          f"({used.source}), {len(job.thresholds.classes)} class thresholds; output {summary.output}: "
          f"{summary.total_rows} rows, {summary.total_errors} unreadable, anomaly rate {rate}")
    return summary
