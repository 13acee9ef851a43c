"""Local paths of a config made absolute on the driver, so that workers reading them find the same files.

Ray Train workers and Tune trials run in other working folders than the command that started them, so a
relative path (runs, ./weights.pth) there names another place or nothing. URIs (s3://, gs://, file://)
and the words 'hub'/'none' of model.encoder_weights are left as they are.

    config = with_absolute_paths(config)          # on the driver, before any Ray work
    init_from = absolute_path(args.init_from)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dinomaly.config.jobs import Config

ENCODER_WEIGHT_WORDS = ("hub", "none")  # model.encoder_weights values that are not paths


def absolute_path(value: str, cwd: str | Path | None = None) -> str:
    """A local path made absolute against cwd (default: this process's folder), '~' expanded; '' and URIs
    are returned unchanged."""
    if not value or "://" in value:
        return value
    path = os.path.expanduser(value)
    return os.path.normpath(os.path.join(cwd if cwd is not None else os.getcwd(), path))


def with_absolute_paths(config: Config, cwd: str | Path | None = None) -> Config:
    """config with every local path a worker may read absolute: output_root, tune.cache_root, data.root,
    data.visa_split_csv, model.encoder_weights (a file), serve.auth_token_file."""
    weights = config.model.encoder_weights
    if weights not in ENCODER_WEIGHT_WORDS:
        weights = absolute_path(weights, cwd)
    return dataclasses.replace(
        config, output_root=absolute_path(config.output_root, cwd),
        model=dataclasses.replace(config.model, encoder_weights=weights),
        data=dataclasses.replace(config.data, root=absolute_path(config.data.root, cwd),
                                 visa_split_csv=absolute_path(config.data.visa_split_csv, cwd)),
        tune=dataclasses.replace(config.tune, cache_root=absolute_path(config.tune.cache_root, cwd)),
        serve=dataclasses.replace(config.serve, auth_token_file=absolute_path(config.serve.auth_token_file, cwd)))
