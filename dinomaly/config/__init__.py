"""One typed configuration for every entry point: YAML presets plus `section.key=value` overrides.

    sections.py   model, data, train, eval, tracking (what a training run computes and records)
    jobs.py       serve, tune, cluster and `Config`, the whole run
    loader.py     presets, overrides, type checks, flatten, --help text
"""

from dinomaly.config.jobs import (
    DEFAULT_SEARCH_SPACE,
    MAX_SCORE,
    ClusterConfig,
    Config,
    ServeConfig,
    TuneConfig,
)
from dinomaly.config.loader import (
    CONFIG_DIR,
    apply_overrides,
    describe,
    flatten,
    from_dict,
    help_text,
    load_config,
    parse_override,
    read_float_text,
    read_yaml,
    to_dict,
)
from dinomaly.config.sections import (
    REFERENCE_TARGET_LAYERS,
    DataConfig,
    DinomalyConfig,
    EvalConfig,
    TrackingConfig,
    TrainConfig,
    doc,
)

__all__ = [
    "CONFIG_DIR", "DEFAULT_SEARCH_SPACE", "MAX_SCORE", "REFERENCE_TARGET_LAYERS", "ClusterConfig", "Config",
    "DataConfig", "DinomalyConfig", "EvalConfig", "ServeConfig", "TrackingConfig", "TrainConfig", "TuneConfig", "apply_overrides",
    "describe", "doc", "flatten", "from_dict", "help_text", "load_config", "parse_override", "read_float_text",
    "read_yaml", "to_dict",
]
