"""Where a served model comes from: a checkpoint directory, an s3:// prefix, or the MLflow Model Registry.

`resolve_model` turns any of them into a local `dinomaly.checkpoint.save` directory plus the name,
version, tags (thresholds) and metrics the service reports. Registry versions are those
`dinomaly.distributed.tracking` registers: the version source is the logged checkpoint directory.
Nothing on this path unpickles: artifacts are plain files and the checkpoint is safetensors + JSON.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dinomaly.checkpoint import CONFIG_FILE, MODEL_FILE
from dinomaly.config import Config
from dinomaly.data.storage import filesystem_for, split_uri
from dinomaly.distributed.tracking import resolve_tracking_uri
from dinomaly.export.predictor import is_exported

logger = logging.getLogger(__name__)

_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?")


@dataclass
class ResolvedModel:
    """A local checkpoint directory (or an exported model file) and what the registry (if any) says about it."""

    directory: Path
    name: str = ""
    version: str = ""
    source: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    download_dir: Path | None = None  # a temporary copy, removed by cleanup()

    def cleanup(self) -> None:
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)
            self.download_dir = None


def _checkpoint_in(root: Path, what: str) -> Path:
    """`root` itself or its single sub-folder holding model.safetensors + config.json."""
    if (root / MODEL_FILE).is_file() and (root / CONFIG_FILE).is_file():
        return root
    found = sorted(p for p in root.iterdir()
                   if p.is_dir() and (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file())
    if not found:
        listing = sorted(p.name for p in root.iterdir())
        raise FileNotFoundError(f"{what} holds no dinomaly checkpoint ({MODEL_FILE} + {CONFIG_FILE}); found "
                                f"{listing}; point --model at a directory written by dinomaly.checkpoint.save")
    if len(found) > 1:  # a run folder: its final model and the periodic checkpoints; never guess which
        names = [p.name for p in found]
        example = "checkpoint" if "checkpoint" in names else names[-1]  # a training run's final model
        raise ValueError(f"{what} holds {len(found)} checkpoints ({', '.join(names)}); point --model at one of "
                         f"them, e.g. {what.rstrip('/')}/{example}")
    return found[0]


def _registry_holds(client, limit: int = 10) -> str:
    """What the registry holds, as the fix for a wrong name or alias: its models with their aliases."""
    from mlflow.exceptions import MlflowException

    try:
        models = client.search_registered_models(max_results=limit + 1)
    except MlflowException:
        return "its models could not be listed"
    if not models:
        return "it holds no registered models yet (training, tune.py and calibrate.py register them)"
    named = [f"{m.name}" + (f" (@{', @'.join(sorted(m.aliases))})" if m.aliases else "") for m in models[:limit]]
    return "it holds " + ", ".join(named) + (", ..." if len(models) > limit else "")


def _from_registry(uri: str, config: Config) -> ResolvedModel:
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    match = _REGISTRY_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"model URI {uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    name, alias = match["name"], match["alias"]
    tracking_uri = resolve_tracking_uri(config.tracking)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = (client.get_model_version_by_alias(name, alias) if alias
                   else client.get_model_version(name, match["version"]))
    except MlflowException as err:
        raise ValueError(f"{uri} is not in the registry at {tracking_uri} ({err.message}); {_registry_holds(client)}; "
                         "see their versions and aliases in the MLflow UI (Models) or with "
                         f"MlflowClient().search_model_versions(\"name='{name}'\"), or set tracking.tracking_uri / "
                         "MLFLOW_TRACKING_URI") from err
    metrics = dict(client.get_run(version.run_id).data.metrics) if version.run_id else {}
    download = Path(tempfile.mkdtemp(prefix="dinomaly-model-"))
    try:
        local = download_artifacts(artifact_uri=version.source, dst_path=str(download), tracking_uri=tracking_uri)
        directory = _checkpoint_in(Path(local), f"{uri} (source {version.source})")
    except BaseException:
        shutil.rmtree(download, ignore_errors=True)
        raise
    logger.info("resolved %s to version %s (%s)", uri, version.version, version.source)
    return ResolvedModel(directory=directory, name=name, version=str(version.version), source=uri,
                         tags=dict(version.tags), metrics=metrics, download_dir=download)


def _from_object_store(uri: str, config: Config) -> ResolvedModel:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri, config.data)
    download = Path(tempfile.mkdtemp(prefix="dinomaly-model-"))
    try:
        if fs.get_file_info(f"{path}/{MODEL_FILE}").type != pafs.FileType.File:
            raise FileNotFoundError(f"{uri}/{MODEL_FILE} does not exist; point --model at a checkpoint prefix")
        pafs.copy_files(path, str(download), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        directory = _checkpoint_in(download, uri)
    except BaseException:
        shutil.rmtree(download, ignore_errors=True)
        raise
    return ResolvedModel(directory=directory, source=uri, download_dir=download)


def resolve_model(uri: str, config: Config) -> ResolvedModel:
    """A local checkpoint directory for `uri`: a path, file://, s3:// (copied), models:/... (downloaded).

    Raises FileNotFoundError / ValueError naming the URI and the fix. Call `cleanup()` when done with a
    downloaded copy.
    """
    if uri.startswith("models:/"):
        return _from_registry(uri, config)
    scheme, path = split_uri(uri)
    if scheme:
        return _from_object_store(uri, config)
    directory = Path(path)
    if directory.is_file() and is_exported(directory):  # pipelines/export.py's model.onnx / model.xml
        return ResolvedModel(directory=directory, source=str(directory))
    kinds = "a checkpoint directory, an exported model.onnx, an s3:// prefix or models:/<name>@<alias>"
    if not directory.exists():
        raise FileNotFoundError(f"model {uri!r} does not exist; fix the path, or pass {kinds}")
    if directory.suffix.lower() in (".pth", ".pt", ".safetensors"):
        raise ValueError(f"{uri} looks like official Dinomaly weights, which carry no config or thresholds to serve "
                         f"with; fine-tune them into a checkpoint (pipelines/train.py --init-from {uri}), or "
                         "score them with evaluate.py/predict.py --config <preset>")
    if not directory.is_dir():
        raise FileNotFoundError(f"model {uri!r} is not a directory; pass {kinds}")
    return ResolvedModel(directory=_checkpoint_in(directory, uri), source=str(directory))
