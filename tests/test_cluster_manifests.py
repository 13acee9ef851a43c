"""cluster/ stays true to the code: every YAML parses, every entry point, import path and config key it
names exists, and every Ray image and version pin matches pyproject.toml.

Nothing here deploys: the manifests are checked as text against the package (the parsers of the
pipelines themselves read the commands, dinomaly.config validates every key).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from dinomaly.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file()) + [REPO / ".rayignore"]
PIPELINE_COMMAND = re.compile(r"pipelines/(\w+)\.py")


def documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node, key=None):
    """(key, value) for every scalar in a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)
    else:
        yield key, node


def embedded_yaml(doc: dict) -> list[dict]:
    """KubeRay keeps the Serve config and a job's runtime_env as YAML strings inside the manifest."""
    spec = doc.get("spec") or {}
    return [yaml.safe_load(spec[key]) for key in ("serveConfigV2", "runtimeEnvYAML") if key in spec]


def serve_configs() -> list[tuple[Path, dict]]:
    configs = []
    for path in YAML_FILES:
        for doc in documents(path):
            candidates = [doc, *embedded_yaml(doc)] if isinstance(doc, dict) else []
            configs += [(path, c) for c in candidates if isinstance(c, dict) and "applications" in c]
    return configs


def shell_commands() -> list[tuple[Path, str]]:
    """Every command in cluster/ (manifest values, README code blocks, script code) that runs pipelines/*.py."""
    lines = []
    for path in TEXT_FILES:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):  # values, so commands in comments are left out
            text = "\n".join(str(v) for doc in documents(path) for _, v in walk(doc))
        elif path.suffix == ".md":  # the fenced bash blocks
            text = "\n".join(re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", text, re.M | re.S))
        else:
            text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        lines += [(path, line) for line in text.splitlines() if PIPELINE_COMMAND.search(line)]
    return lines


def pipeline_arguments(line: str) -> tuple[str, list[str]]:
    """'... python pipelines/train.py --workers 2 ... | tee x' -> ('train', ['--workers', '2', ...])."""
    tokens = shlex.split(line.split("#", 1)[0] if " #" in line else line)
    start = next(i for i, t in enumerate(tokens) if PIPELINE_COMMAND.search(t))
    name = PIPELINE_COMMAND.search(tokens[start]).group(1)
    rest = []
    for token in tokens[start + 1:]:
        if token in ("|", "&&", ";", ">", "2>&1", "&") or token.startswith(">"):
            break
        rest.append(token)
    return name, rest


def load_pipeline(name: str):
    """pipelines/<name>.py as a module (pipelines/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_pipeline", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyproject_pins() -> tuple[str, str]:
    """('2.60', 'py311') from pyproject.toml: the Ray minor version and the Python tag."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if re.match(r"ray(\[|=)", d))
    ray_minor = re.search(r"==\s*(\d+\.\d+)", ray_pin).group(1)
    python = re.search(r">=\s*3\.(\d+)", project["requires-python"]).group(1)
    return ray_minor, f"py3{python}"


def test_cluster_has_the_promised_files():
    expected = ["kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayservice.yaml",
                "launcher/aws-gpu.yaml", "runtime_env.yaml", "storage/minio.yaml", "mlflow/mlflow-server.yaml",
                "serve_config.yaml", "local/multinode.sh", "image/Dockerfile", "README.md"]
    assert [name for name in expected if not (CLUSTER / name).exists()] == []


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    docs = documents(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        for inner in embedded_yaml(doc):
            assert isinstance(inner, dict), f"{path}: embedded YAML of {doc.get('kind')} is not a mapping"


def test_versions_match_pyproject():
    ray_minor, python_tag = pyproject_pins()
    assert importlib.metadata.version("ray").startswith(ray_minor + ".")
    ray_versions, images = [], []
    for path in YAML_FILES:
        for doc in documents(path):
            for key, value in walk(doc):
                if key == "rayVersion":
                    ray_versions.append((path, str(value)))
                if key == "image" and isinstance(value, str):
                    images.append((path, value))
    dockerfile = (CLUSTER / "image" / "Dockerfile").read_text()
    images += [(CLUSTER / "image/Dockerfile", m) for m in re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)]
    assert len(ray_versions) >= 2 and len(images) >= 5
    assert [(p, v) for p, v in ray_versions if not v.startswith(ray_minor + ".")] == []
    ray_images = [(p, i) for p, i in images if "ray" in i or "dinomaly" in i]
    assert {i for _, i in ray_images} >= {f"rayproject/ray:{ray_minor}.0-{python_tag}-gpu"}
    wrong = [(str(p.relative_to(REPO)), i) for p, i in ray_images
             if not re.search(rf"ray:?{re.escape(ray_minor)}\.\d+-{python_tag}", i)]
    assert wrong == [], f"Ray images must carry ray {ray_minor} and {python_tag}"


def test_entry_points_exist():
    names = {m.group(1) for path in TEXT_FILES for m in PIPELINE_COMMAND.finditer(path.read_text())}
    assert {"train", "tune", "serve"} <= names
    assert [n for n in sorted(names) if not (REPO / "pipelines" / f"{n}.py").exists()] == []
    import_paths = {(path, c["import_path"]) for path, config in serve_configs() for c in config["applications"]}
    assert len(import_paths) >= 2
    for path, import_path in import_paths:
        module, attribute = import_path.split(":")
        source = REPO / (module.replace(".", "/") + ".py")
        assert source.exists(), f"{path}: {import_path} names a missing module"
        defined = {n.name for n in ast.parse(source.read_text()).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in ast.parse(source.read_text()).body if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        assert attribute in defined, f"{path}: {import_path}: {source.name} has no {attribute}"


def test_pipeline_commands_parse_and_name_real_config_keys():
    """Each command is read by the pipeline's own parser (unknown flags fail) and its config is built."""
    builders = {name: load_pipeline(name) for name in ("train", "tune")}
    commands = shell_commands()
    assert sum("pipelines/train.py" in line for _, line in commands) >= 3
    for path, line in commands:
        name, args = pipeline_arguments(line)
        try:
            if name in builders:
                builders[name].config_from_args(builders[name].build_parser().parse_args(args))
            else:  # other pipelines: the preset and every --set key must still exist
                preset = args[args.index("--config") + 1] if "--config" in args else None
                load_config(preset, [args[i + 1] for i, token in enumerate(args) if token == "--set"])
        except (SystemExit, ValueError, FileNotFoundError) as err:  # argparse exits on unknown flags
            pytest.fail(f"{path.relative_to(REPO)}: pipelines/{name}.py rejects {' '.join(args)!r}: {err!r}")


def test_serve_app_args_are_config_keys():
    for path, config in serve_configs():
        for app in config["applications"]:
            args = dict(app.get("args") or {})
            assert "model" in args, f"{path}: the serve app needs a model"
            args.pop("model")
            built = apply_overrides(load_config(args.pop("config", None)), args)
            assert built.serve.max_ongoing_requests >= built.serve.max_batch_size
            for deployment in app.get("deployments", []):
                assert f"class {deployment['name']}" in (REPO / "dinomaly/distributed/serve/app.py").read_text()


def test_runtime_env_matches_the_pod_environment():
    from ray.runtime_env import RuntimeEnv

    runtime_env = documents(CLUSTER / "runtime_env.yaml")[0]
    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    env = runtime_env["env_vars"]
    assert {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} <= set(env)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env  # single-machine only; a cluster must not set it
    assert not any("SECRET" in key or "PASSWORD" in key for key in env)
    config_map = next(d for d in documents(CLUSTER / "kuberay/raycluster.yaml") if d["kind"] == "ConfigMap")
    assert config_map["data"] == env


def test_rayignore_keeps_code_and_drops_data():
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", (REPO / ".rayignore").read_text().splitlines())
    code = [p.relative_to(REPO).as_posix() for top in ("dinomaly", "pipelines", "configs", "cluster")
            for p in (REPO / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(code) > 20
    assert [p for p in code if spec.match_file(p)] == []
    for path in (".venv/bin/python", "runs/demo/checkpoint/model.safetensors", "mlflow.db",
                 "demo_data/nut/train/good/000.png", "data/mvtec/bottle/train/good/000.png", "x/model.pth"):
        assert spec.match_file(path), f"{path} would be uploaded with the job"


def test_local_multinode_script_is_valid_and_stops_by_pid():
    script = CLUSTER / "local" / "multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"\bray\"? stop\b|pkill|killall", line) for line in code)
