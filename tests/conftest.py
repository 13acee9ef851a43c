"""Shared fixtures: the reference vectors, a tiny model config, generated demo data, one Ray per session.

Area-specific fixtures live in tests/fixtures_<area>.py and are registered in `pytest_plugins` below.
"""

import os

# Before anything imports Ray: keep every Ray socket on loopback, no duplicated worker prints.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Each Train run would start a watcher actor (one more process) polling for node drains; a local test cluster
# is never drained. tests/test_multinode.py's cluster keeps Ray's default.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(os.environ.get("DINOMALY_REFERENCE_DIR", Path(__file__).resolve().parent / "reference"))

REFERENCE_FILES = ("vectors.pt", "official_checkpoint.pth", "trajectory.pt")

pytest_plugins: list[str] = ["fixtures_data", "fixtures_s3", "fixtures_ray", "fixtures_serving", "fixtures_mlflow",
                             "fixtures_predict", "fixtures_evaluate"]


# Cluster modules that `make test` runs on a second session cluster, on the worker that runs the rest.
SECOND_CLUSTER = {"tests/test_tuning.py"}


@pytest.hookimpl(wrapper=True)  # runs before pytest-xdist reads the groups (a plain hook may run after it)
def pytest_collection_modifyitems(config, items):
    """Every test that uses the session Ray cluster is `slow`, so `make test-fast` (-m "not slow") never starts Ray.

    Worker groups for `make test` (pytest-xdist, --dist loadgroup): a module runs whole on one worker, so its
    module fixtures are built once and its release check sees only its own work. The modules that use the
    session's Ray cluster form two groups, each on one worker with its own cluster (`ray_session` is per
    process): the Tune sweeps (SECOND_CLUSTER) run beside the modules that need no session cluster (the
    multinode cluster, subprocess pipelines, the core), which are mostly waits on servers and process
    start-ups, and the rest of the cluster modules run on the other worker. That balances the two workers.
    """
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    on_cluster = {module(item) for item in items if "ray_session" in getattr(item, "fixturenames", ())}
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        name = module(item)
        group = name if name not in on_cluster else "ray_session_2" if name in SECOND_CLUSTER else "ray_session"
        item.add_marker(pytest.mark.xdist_group(group))
    return (yield)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """tests/reference: vectors from the official code (tests/reference/README.md); DINOMALY_REFERENCE_DIR overrides."""
    missing = [name for name in REFERENCE_FILES if not (REFERENCE_DIR / name).exists()]
    if missing:
        pytest.fail(f"reference files {missing} missing in {REFERENCE_DIR}; they are part of the repository "
                    "(tests/reference/), or set DINOMALY_REFERENCE_DIR")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def vectors(reference_dir):
    import torch

    return torch.load(reference_dir / "vectors.pt", weights_only=True)


@pytest.fixture(scope="session")
def official_state_dict(reference_dir):
    import torch

    return torch.load(reference_dir / "official_checkpoint.pth", weights_only=True)


@pytest.fixture(scope="session")
def trajectory(reference_dir):
    import torch

    return torch.load(reference_dir / "trajectory.pt", weights_only=True)


def check_trajectory(records, params_by_step, trajectory, first_step=1):
    """The README's trajectory tolerances: lr/p abs 1e-9, loss abs 1e-6, grad norm rel 2e-5, params 5e-6+5e-7*s."""
    import torch

    assert [r["step"] for r in records] == list(range(first_step, first_step + len(records)))
    for rec in records:
        i = rec["step"] - 1
        assert rec["lr"] == pytest.approx(trajectory["lr"][i], abs=1e-9, rel=0), f"lr of step {rec['step']}"
        assert rec["p"] == pytest.approx(trajectory["p"][i], abs=1e-9, rel=0), f"p of step {rec['step']}"
        assert rec["loss"] == pytest.approx(trajectory["loss"][i], abs=1e-6, rel=0), f"loss of step {rec['step']}"
        assert rec["grad_norm"] == pytest.approx(trajectory["grad_norm"][i], rel=2e-5, abs=0), \
            f"grad_norm of step {rec['step']}"
    for step, params in params_by_step.items():
        assert len(params) == 100
        for name, value in params.items():
            torch.testing.assert_close(value, trajectory[f"params/step{step}/{name}"], rtol=0, atol=5e-6 + 5e-7 * step,
                                       msg=lambda m, n=name, s=step: f"params after step {s}, {n}: {m}")


def reference_model_config(**overrides):
    """The reference's tiny model: DINOv2-reg ViT, width 32, 2 heads, 12 blocks, random weights."""
    from dinomaly.config import DinomalyConfig

    values = dict(encoder="vit_small_patch14_reg4_dinov2", encoder_weights="none",
                  encoder_kwargs={"embed_dim": 32, "num_heads": 2}, image_size=84, crop_size=84)
    values.update(overrides)
    return DinomalyConfig(**values)


@pytest.fixture
def tiny_model_config():
    return reference_model_config()


@pytest.fixture(scope="session")
def reference_model(official_state_dict):
    """The reference tiny model with official_checkpoint.pth loaded strictly, in eval mode."""
    from dinomaly.checkpoint import load_official

    model = load_official(official_state_dict, config=reference_model_config())
    return model.eval()
