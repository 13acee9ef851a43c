"""cluster/ stays true to the code: every YAML parses and validates against its schema (KubeRay's CRD
fields for v1.5.1-v1.7.0 with Kubernetes' own pod template inside, Kubernetes' API schemas of 1.25-1.37 for
the core objects, Ray's launcher schema, Serve's schema, Ray's RuntimeEnv), every entry point, import path
and config key it names exists, and every Ray image and version pin matches pyproject.toml.

Nothing here deploys: the manifests are checked as text against the package (the parsers of the
pipelines themselves read the commands, dinomaly.config validates every key) and against the schemas in
tests/schemas/ (the KubeRay one is hand-written; tests/schemas/README.md says from what) and the strict
Kubernetes schemas that the kubernetes-validate package ships.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.metadata
import importlib.resources
import importlib.util
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version
from referencing import Registry, Resource

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


# --- schema validation: KubeRay CRDs, Kubernetes, Ray's cluster launcher, Serve ----------------------------

SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERAY_SCHEMA = SCHEMAS / "kuberay-v1.5.1-v1.7.0" / "ray.io_v1.subset.yaml"  # hand-written: schemas/README.md
# every Kubernetes release kubernetes-validate has strict API schemas for (1.25 to 1.37 in the pinned version)
KUBERNETES_VERSIONS = sorted(set(all_versions()), key=Version)


@functools.cache
def kubernetes_definitions(version: str) -> Registry:
    """Kubernetes' API types of one release (strict: unknown fields rejected), as the KubeRay schema refers to them."""
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    return Resource.from_contents(json.loads((folder / "_definitions.json").read_text())) @ Registry()


@functools.cache
def kuberay_schema(kind: str) -> dict:
    return yaml.safe_load(KUBERAY_SCHEMA.read_text())["kinds"][kind]


def launcher_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def closed(schema):
    """Serve's JSON schema with unknown keys rejected: Serve itself ignores them, so a typo does nothing."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(value) for value in schema]
    return schema


def schema_errors(document: dict, schema: dict, registry: Registry | None = None) -> list[str]:
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = validator_class(schema, registry=registry) if registry else validator_class(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(document)]


def kubernetes_errors(document: dict) -> list[str]:
    """A KubeRay object against our schema, or a core object against Kubernetes' own, for every release."""
    errors = []
    for version in KUBERNETES_VERSIONS:
        if document.get("apiVersion", "").startswith("ray.io/"):
            found = schema_errors(document, kuberay_schema(document["kind"]), kubernetes_definitions(version))
        else:
            try:
                kubernetes_validate.validate(document, version, strict=True)
                found = []
            except kubernetes_validate.SchemaNotFoundError as err:
                found = [err.message]
            except kubernetes_validate.ValidationError as err:
                found = [f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"]
        errors += [f"Kubernetes {version}: {e}" for e in found]
    return errors


def serve_errors(config: dict) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)  # Serve's own types and checks
    except pydantic.ValidationError as err:
        return [str(err)]
    return schema_errors(config, closed(ServeDeploySchema.model_json_schema()))


def manifest_errors(document: dict) -> list[str]:
    """Every schema problem of one cluster/ document, by what the document is."""
    if "applications" in document:
        return serve_errors(document)
    if "provider" in document and "available_node_types" in document:
        return schema_errors(document, launcher_schema())
    if "apiVersion" in document and "kind" in document:
        return kubernetes_errors(document) + [e for inner in embedded_yaml(document) if "applications" in inner
                                              for e in serve_errors(inner)]
    return [f"no schema for {sorted(document)[:3]}"]


SCHEMA_DOCUMENTS = [(path, i, doc) for path in YAML_FILES if path.name != "runtime_env.yaml"
                    for i, doc in enumerate(documents(path))]


@pytest.mark.parametrize("path,index,document", SCHEMA_DOCUMENTS,
                         ids=[f"{p.relative_to(CLUSTER)}#{i}" for p, i, _ in SCHEMA_DOCUMENTS])
def test_manifest_validates_against_its_schema(path, index, document):
    assert manifest_errors(document) == [], f"{path.relative_to(REPO)} document {index}"


def test_every_kind_of_schema_is_exercised():
    kinds = {d.get("kind") for _, _, d in SCHEMA_DOCUMENTS}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds
    assert any("provider" in d for _, _, d in SCHEMA_DOCUMENTS)
    assert len(serve_configs()) >= 2


def misspelled(path: str, key_path: list, wrong: str) -> dict:
    """The first document of cluster/<path> with the key at key_path renamed to `wrong`."""
    document = copy.deepcopy(documents(CLUSTER / path)[0])
    node = document
    for key in key_path[:-1]:
        node = node[key]
    node[wrong] = node.pop(key_path[-1])
    return document


@pytest.mark.parametrize("path,key_path,wrong", [
    ("kuberay/raycluster.yaml", ["spec", "workerGroupSpecs", 0, "maxReplicas"], "maxReplica"),
    ("kuberay/raycluster.yaml", ["spec", "headGroupSpec", "template", "spec", "containers", 0, "volumeMounts"],
     "volumeMount"),
    ("kuberay/rayjob-train.yaml", ["spec", "entrypoint"], "entryPoint"),
    ("kuberay/rayservice.yaml", ["spec", "rayClusterConfig", "authOptions"], "authOption"),
    ("kuberay/rayservice.yaml", ["metadata", "name"], "nmae"),
    ("mlflow/mlflow-server.yaml", ["stringData"], "stringdata"),
    ("launcher/aws-gpu.yaml", ["available_node_types", "gpu_worker", "min_workers"], "min_worker"),
    ("serve_config.yaml", ["applications", 0, "import_path"], "improt_path"),
    ("serve_config.yaml", ["applications", 0, "deployments", 0, "user_config"], "user_conifg"),
])
def test_a_misspelled_field_fails_validation(path, key_path, wrong):
    assert manifest_errors(misspelled(path, key_path, wrong)) != []


def test_a_misspelled_field_inside_the_embedded_serve_config_fails():
    service = copy.deepcopy(documents(CLUSTER / "kuberay/rayservice.yaml")[0])
    service["spec"]["serveConfigV2"] = service["spec"]["serveConfigV2"].replace("route_prefix", "route_prefx")
    assert manifest_errors(service) != []


def document_of_kind(path: str, kind: str) -> dict:
    return copy.deepcopy(next(d for d in documents(CLUSTER / path) if d.get("kind") == kind))


def test_core_objects_are_checked_against_kubernetes_own_schema():
    deployment = document_of_kind("storage/minio.yaml", "Deployment")
    deployment["spec"]["replicas"] = "one"
    assert any("spec.replicas" in e for e in manifest_errors(deployment))
    job = document_of_kind("storage/minio.yaml", "Job")
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    assert any("backofLimit" in e for e in manifest_errors(job))


def test_ray_pod_templates_are_kubernetes_pod_templates():
    """Any real pod field is accepted (the Kubernetes types are not cut down by hand), typed and per release."""
    cluster = document_of_kind("kuberay/raycluster.yaml", "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    head["priorityClassName"] = "inspection"
    head["securityContext"] = {"runAsNonRoot": True, "fsGroup": 1000}
    gpu_nodes = {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["g5.xlarge"]}
    head["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [gpu_nodes]}]}}}
    assert manifest_errors(cluster) == []
    head["containers"][0]["ports"] = [{"containerPort": "gcs"}]
    assert any("containerPort" in e for e in manifest_errors(cluster))
    head["containers"][0]["ports"] = [{"containerPort": 6379}]
    head["containers"][0]["resizePolicy"] = [{"resourceName": "cpu", "restartPolicy": "NotRequired"}]  # since 1.27
    failing = {e.split(":")[0] for e in manifest_errors(cluster)}
    assert failing == {"Kubernetes 1.25.0", "Kubernetes 1.26.0"}


# --- what a real cluster needs that the schemas cannot see ----------------------------------------------

def ray_pod_templates() -> list[tuple[str, dict]]:
    templates = []
    for path in YAML_FILES:
        for doc in documents(path):
            spec = doc.get("spec") or {}
            cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
            if doc.get("apiVersion", "").startswith("ray.io/") and "headGroupSpec" in cluster:
                groups = [("head", cluster["headGroupSpec"])]
                groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
                templates += [(f"{path.name}:{name}", group["template"]["spec"]) for name, group in groups]
    return templates


def test_every_ray_pod_mounts_a_memory_dev_shm():
    templates = ray_pod_templates()
    assert len(templates) >= 4
    for where, pod in templates:
        memory_volumes = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
        assert mounts and mounts <= memory_volumes, f"{where}: /dev/shm is not a memory emptyDir"


def test_the_bucket_is_a_parameter():
    """S3 bucket names are global: no file in cluster/ may name one; they read DINOMALY_BUCKET.

    The local cluster (multinode.sh) is exempt: its bucket lives in a moto server on this machine.
    """
    hard_coded = [(str(p.relative_to(REPO)), line) for p in TEXT_FILES for line in p.read_text().splitlines()
                  if re.search(r"s3://dinomaly\b|store/dinomaly\b", line) and "multinode" not in line]
    assert hard_coded == []
    users = [p for p in TEXT_FILES if "DINOMALY_BUCKET" in p.read_text()]
    assert len(users) >= 5


def test_applying_the_kuberay_files_never_overwrites_a_secret():
    """The serve token is made once with kubectl; a Secret in these files would reset it on every apply."""
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        assert [d["metadata"]["name"] for d in documents(path) if d["kind"] == "Secret"] == [], path.name


def test_every_pod_pulls_our_image_with_the_registry_login():
    pods = [(p.name, doc) for p in YAML_FILES for doc in documents(p)]
    ours = 0
    for name, doc in pods:
        for _, pod in walk_pod_specs(doc):
            images = [c["image"] for c in pod["containers"] if "dinomaly:" in c["image"]]
            if images:
                ours += 1
                assert pod.get("imagePullSecrets") == [{"name": "dinomaly-registry"}], f"{name}: {images}"
    assert ours >= 6


def walk_pod_specs(node, key=None):
    """(key, pod spec) for every mapping with a containers list, at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield key, node
        for k, v in node.items():
            yield from walk_pod_specs(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from walk_pod_specs(v, key)


def test_the_launcher_head_may_start_workers():
    """Without EC2 launch rights and iam:PassRole on the workers' role, no GPU worker ever starts."""
    launcher = documents(CLUSTER / "launcher/aws-gpu.yaml")[0]
    nodes = launcher["available_node_types"]
    head = nodes[launcher["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {n["node_config"]["IamInstanceProfile"]["Name"] for name, n in nodes.items()
               if name != launcher["head_node_type"]}
    policy = json.loads((CLUSTER / "launcher/iam-head-policy.json").read_text())
    granted = {(a, r) for s in policy["Statement"] if s["Effect"] == "Allow"
               for a in s["Action"] for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert {a for a, _ in granted} >= {"ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "iam:PassRole"}
    assert {r.rsplit("/", 1)[-1] for a, r in granted if a == "iam:PassRole"} == workers
    assert head not in workers
    worker_policy = json.loads((CLUSTER / "launcher/iam-worker-policy.json").read_text())
    worker_actions = {a for s in worker_policy["Statement"] for a in s["Action"]}
    assert "s3:GetObject" in worker_actions and not any(a.startswith(("ec2:", "iam:")) for a in worker_actions)
    for node in nodes.values():  # the CUDA 13 wheels need driver >= 580: never Ray's default (older) AMI
        assert node["node_config"].get("ImageId", "").startswith("ami-")
