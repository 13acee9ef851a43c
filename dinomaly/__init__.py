"""Dinomaly multi-class anomaly detection, faithful to the reference, distributed on Ray."""

from dinomaly.config import Config, DinomalyConfig, load_config

__all__ = ["Config", "Dinomaly", "DinomalyConfig", "load_config"]


def __getattr__(name: str):
    # Lazy: `import dinomaly` for configs must not pull in timm.
    if name == "Dinomaly":
        from dinomaly.model.dinomaly import Dinomaly

        return Dinomaly
    raise AttributeError(f"module 'dinomaly' has no attribute {name!r}")
