"""One command-line vocabulary: every pipeline's flags against the README table, old spellings, one-line errors,
--output as a fresh run, and storage that must outlive a Ray job's temporary working folder.

Parsers are built in-process (`build_parser()`); a pipeline without one is read through `--help` in a
subprocess. Nothing here starts Ray: training entry points run with the run step replaced.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dinomaly.config.cli import VOCABULARY, flag_name, vocabulary_of

REPO = Path(__file__).resolve().parent.parent
PIPELINES = sorted(p.stem for p in (REPO / "pipelines").glob("*.py") if not p.stem.startswith("_"))


@functools.cache
def load_pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_flags(name: str) -> set[str]:
    """The vocabulary flags of a pipeline: from its build_parser(), else from the options of its --help."""
    module = load_pipeline(name)
    if hasattr(module, "build_parser"):
        return vocabulary_of(module.build_parser())
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / f"{name}.py"), "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    options = set(re.findall(r"^\s{2}(?:-\w, )?(--[\w-]+)", result.stdout, re.M))
    return options & {flag_name(dest) for dest in VOCABULARY}


def readme_table() -> dict[str, set[str]]:
    """README's command-line table: flag -> the pipelines that take it."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(--[\w-]+)` \|.*\| ([\w, ]+) \|$", section, re.M)
    assert rows, "README.md has no '## Command line' table of | `--flag` | meaning | pipelines |"
    return {flag: {p.strip() for p in names.split(",")} for flag, names in rows}


@pytest.fixture(scope="module")
def flags_by_pipeline() -> dict[str, set[str]]:
    return {name: help_flags(name) for name in PIPELINES}


def test_every_pipeline_answers_help(capsys):
    for name in PIPELINES:
        module = load_pipeline(name)
        if not hasattr(module, "build_parser"):
            continue  # read through a subprocess --help in help_flags
        with pytest.raises(SystemExit) as exit_info:
            module.build_parser().parse_args(["--help"])
        assert exit_info.value.code == 0, name
        assert "--debug" in capsys.readouterr().out, name


def config_keys_in_help(name: str) -> set[str]:
    return set(re.findall(r"^  ([\w.]+) = ", load_pipeline(name).build_parser().format_help(), re.M))


def test_help_lists_the_config_keys_its_job_reads_and_every_key_is_listed_somewhere():
    from dinomaly.config.loader import describe

    shown = {name: config_keys_in_help(name) for name in ("train", "tune", "evaluate", "predict", "calibrate",
                                                          "export", "serve")}
    assert {"train.lr", "data.fast_decode", "tune.metrics", "name"} <= shown["train"]
    assert not any(key.startswith("serve.") for key in shown["train"] | shown["tune"])
    assert {"serve.port", "serve.threshold", "model.image_size"} <= shown["serve"]
    assert not any(key.startswith(("train.", "tune.")) for key in shown["serve"])
    assert {"eval.target_fpr", "train.seed"} <= shown["calibrate"] and "train.lr" not in shown["calibrate"]
    assert "serve.threshold_method" in shown["predict"] and "serve.port" not in shown["predict"]
    assert set().union(*shown.values()) == {key for key, _, _ in describe()}, "a key no --help explains"


def test_readme_table_matches_the_parsers(flags_by_pipeline):
    table = readme_table()
    assert set(table) == {flag_name(dest) for dest in VOCABULARY}, "one row per vocabulary flag"
    listed = set().union(*table.values())
    assert listed <= set(PIPELINES), f"the table names pipelines that do not exist: {listed - set(PIPELINES)}"
    assert set(PIPELINES) <= listed, f"pipelines missing from the README table: {set(PIPELINES) - listed}"
    for flag, pipelines in table.items():
        takes_it = {name for name, flags in flags_by_pipeline.items() if flag in flags}
        assert takes_it == pipelines, f"{flag}: README says {sorted(pipelines)}, the parsers {sorted(takes_it)}"


def test_one_definition_per_flag_in_the_same_words():
    """Unless a pipeline adapts it, a flag's help is VOCABULARY's text; --debug's is never adapted."""
    seen = {}
    for name in PIPELINES:
        module = load_pipeline(name)
        if not hasattr(module, "build_parser"):
            continue
        for action in module.build_parser()._actions:
            if "--debug" in action.option_strings:
                seen[name] = action.help
    assert set(seen.values()) == {VOCABULARY["debug"][1]}


@pytest.mark.parametrize("pipeline, argv, dest, value", [
    ("tune", ["--output-dir", "sweeps/a"], "output", "sweeps/a"),
    ("prepare_data", ["--root", "data/x", "--out", "m.parquet"], "data", "data/x"),
    ("prepare_data", ["--root", "data/x", "--out", "m.parquet"], "output", "m.parquet"),
    ("predict", ["--model", "m", "--input", "in/", "--output", "o/"], "data", "in/"),
])
def test_old_spellings_still_work_with_a_deprecation_message(pipeline, argv, dest, value, capsys):
    args = load_pipeline(pipeline).build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert "deprecated" in err and flag_name(dest) in err


def test_an_old_spelling_beside_the_new_one_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_pipeline("tune").build_parser().parse_args(["--output-dir", "x", "--output", "y"])
    assert exit_info.value.code == 2
    assert "--output-dir and --output are the same option" in capsys.readouterr().err


def test_a_flag_and_a_set_of_its_key_are_refused_together():
    tune = load_pipeline("tune")
    args = tune.build_parser().parse_args(["--workers", "2", "--set", "train.num_workers=4"])
    with pytest.raises(ValueError, match="--workers and --set train.num_workers=... both set train.num_workers"):
        tune.config_from_args(args)
    from dinomaly.config.cli import actor_settings

    args = load_pipeline("evaluate").build_parser().parse_args(["--model", "m", "--data", "d", "--workers", "2",
                                                                 "--set", "eval.actors=3"])
    with pytest.raises(ValueError, match="--workers and --set eval.actors"):
        actor_settings(args)


def test_prepare_data_refuses_outputs_it_cannot_write_before_indexing(tmp_path, capsys):
    prepare_data = load_pipeline("prepare_data")
    data = tmp_path / "no-such-data"  # never read: every refusal below comes first
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, expected in (
            (["--output", str(tmp_path / "m.csv")], "a manifest is a Parquet file"),
            (["--output", str(tmp_path)], "is a folder; name the manifest file"),
            (["--output", str(blocker / "m.parquet")], "is a file, not a folder"),
            (["--output", str(tmp_path / "m.parquet"), "--categories", "a", "--set", "data.categories=[b]"],
             "--categories and --set data.categories")):
        assert prepare_data.main(["--data", str(data), *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


@pytest.mark.parametrize("pipeline, argv", [
    ("evaluate", ["--model", "m", "--data", "d", "--heatmaps", "-3"]),
    ("export", ["--model", "m", "--output", "o", "--threads", "0"]),
    ("predict", ["--model", "m", "--data", "d", "--output", "o", "--rows-per-file", "0"]),
])
def test_counts_below_their_minimum_are_refused_by_the_parser(pipeline, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_pipeline(pipeline).build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {argv[-2]}: " in err and "is below" in err, err


def test_tune_takes_the_training_vocabulary():
    tune = load_pipeline("tune")
    args = tune.build_parser().parse_args(["--data", "/d/m.parquet", "--output", "/o/sweep", "--name", "s1",
                                           "--workers", "2", "--gpu", "--num-samples", "3"])
    config = tune.config_from_args(args)
    assert (config.data.root, config.name, config.train.num_workers) == ("/d/m.parquet", "s1", 2)
    assert config.train.use_gpu and config.tune.num_samples == 3
    assert config.output_root == "/o/sweep"  # --output holds the sweep folder too
    args = tune.build_parser().parse_args(["--output", "/o/sweep", "--storage-path", "s3://b/sweeps"])
    assert tune.config_from_args(args).output_root == "s3://b/sweeps"


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_pipeline("evaluate").build_parser().parse_args(["--model", "m", "--data", "d", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unrecognized arguments: --bogus")
    with pytest.raises(SystemExit):
        load_pipeline("evaluate").build_parser().parse_args(["--model", "m"])
    assert capsys.readouterr().err.startswith("error: --data is required")


def test_the_usage_line_shows_required_flags_without_brackets():
    parser = load_pipeline("predict").build_parser()
    usage = " ".join(parser.format_usage().split())
    for flag in ("--data URI", "--output DIR", "--model MODEL"):
        assert flag in usage and f"[{flag}]" not in usage
    assert "[--threshold T]" in usage
    # marked only while the text is written: the deprecated spelling may still fill --data
    assert parser.parse_args(["--input", "d", "--output", "o", "--model", "m"]).data == "d"


def missing_mask_dataset(root: Path) -> Path:
    from fixtures_data import make_mvtec

    make_mvtec(root, classes=("bottle",))
    (root / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    return root


def test_prepare_data_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    prepare_data = load_pipeline("prepare_data")
    data = missing_mask_dataset(tmp_path / "mvtec")
    argv = ["--data", str(data), "--output", str(tmp_path / "m.parquet")]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "without a mask: 001.png" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert prepare_data.main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith(err.splitlines()[-1])
    assert prepare_data.main(["--data", str(data), "--output", "x.parquet", "--set", "data.nope=1"]) == 2
    assert "unknown config key 'data.nope'" in capsys.readouterr().err  # a bad config, the same way


def test_run_job_keeps_the_traceback_of_errors_from_ray_workers():
    from ray.exceptions import RayTaskError

    from dinomaly.distributed.entry import run_job

    def worker_failed(_):
        try:
            raise ValueError("a bug in a worker")
        except ValueError as cause:
            raise RayTaskError("train_fn", "traceback text", cause).as_instanceof_cause() from cause

    with pytest.raises(RayTaskError) as raised:  # re-raised whole, not turned into a one-line exit 2
        run_job(lambda: None, worker_failed)
    assert isinstance(raised.value, ValueError)



@pytest.mark.parametrize("wrap", ["ray_core", "ray_data_chain"])
def test_a_refused_data_file_from_a_ray_worker_is_one_line_and_exit_2(wrap, capsys):
    """A mask of the wrong size found inside a Ray task is the user's to fix: exit 2 with its message only."""
    from ray.exceptions import RayTaskError

    from dinomaly.data.transforms import MaskSizeError
    from dinomaly.distributed.entry import run_job

    def task_failed(_):
        cause = MaskSizeError("mask m.png is 17x23 but its image i.png is 256x256")
        if wrap == "ray_core":
            raise RayTaskError("read_rows", "traceback text", cause).as_instanceof_cause()
        try:
            raise cause
        except MaskSizeError as err:  # a chain kept in-process; the pickled actor-pool one: test_data_errors.py
            raise RuntimeError("Exception occurred in user code") from err

    assert run_job(lambda: None, task_failed) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: mask m.png is 17x23 but its image i.png is 256x256"

# --------------------------------------------------------------------------- train --output, jobs


@pytest.fixture
def train_entry(monkeypatch, tmp_path):
    """pipelines/train.py with launch.run replaced: returns the (config, output) each run would get."""
    from dinomaly.distributed.train import run as launch

    calls = []
    monkeypatch.setattr(launch, "run", lambda config, init_from="", output=None: calls.append((config, output)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return load_pipeline("train"), calls


def test_train_output_starts_a_fresh_run_even_when_the_name_is_taken(train_entry, demo_root, tmp_path, capsys):
    train, calls = train_entry
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "checkpoint_manager_snapshot.json").write_text("{}")
    base = ["--config", "demo", "--data", str(demo_root)]
    assert train.main(base) == 2
    err = capsys.readouterr().err
    assert "already exists at runs/demo" in err and "--resume" in err and "--output" in err and "--name" in err
    assert train.main([*base, "--output", "new"]) == 0
    config, output = calls[-1]
    assert str(output) == "new" and config.output_root == "new"  # Ray's run folder: new/demo
    assert train.main([*base, "--output", "new2", "--storage-path", str(tmp_path / "store")]) == 0
    assert calls[-1][0].output_root == str(tmp_path / "store")


def test_ray_environment_quiets_one_ray_warning_and_keeps_the_users_filters(monkeypatch):
    from dinomaly.distributed.cluster import RAY_OWN_WARNING, set_ray_environment

    monkeypatch.setenv("PYTHONWARNINGS", "error::ResourceWarning")
    set_ray_environment()
    set_ray_environment()
    import os

    assert os.environ["PYTHONWARNINGS"] == f"error::ResourceWarning,{RAY_OWN_WARNING}"
    code = ("import warnings\n"
            "warnings.warn('`ExecutionOptions.exclude_resources` is deprecated and will be removed', "
            "DeprecationWarning)\n"
            "warnings.warn('another deprecation', DeprecationWarning)\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "another deprecation" in shown and "exclude_resources" not in shown


def test_in_ray_job_detects_the_package_folder(monkeypatch):
    from dinomaly.distributed.cluster import in_ray_job

    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not in_ray_job("/home/me/project")
    assert in_ray_job("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0a1b")
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    assert in_ray_job("/home/me/project")


def test_a_job_refuses_storage_in_its_temporary_folder(train_entry, demo_root, tmp_path, monkeypatch, capsys):
    train, calls = train_entry
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` gives its entrypoint
    base = ["--config", "demo", "--data", str(demo_root)]
    assert train.main([*base, "--output", str(tmp_path / "out")]) == 2  # absolute output, default MLflow store
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MLflow store sqlite:///mlflow.db" in err
    for named in ("--output", "--storage-path", "MLFLOW_TRACKING_URI"):
        assert named in err
    assert train.main(base + ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert "--output runs/demo" in capsys.readouterr().err  # the default output is relative
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert calls == []
    assert train.main([*base, "--output", str(tmp_path / "out")]) == 0
    config, output = calls[-1]
    assert Path(output).is_absolute() and Path(config.output_root).is_absolute()


def test_demo_steps_keep_the_warmup_share_and_bad_values_write_nothing(tmp_path, monkeypatch):
    demo = load_pipeline("demo")
    seen = {}

    class Launched(Exception):
        pass

    def launch(config, output):
        seen["train"] = config.train
        raise Launched

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dinomaly.distributed.train.run.check_before_start", lambda config: None)
    monkeypatch.setattr("dinomaly.distributed.train.run.run", launch)
    with pytest.raises(Launched):
        demo.demo(demo.build_parser().parse_args(["--steps", "20", "--data", "short"]))
    assert (seen["train"].total_steps, seen["train"].warmup_steps) == (20, 1)  # the preset's 20 of 300
    with pytest.raises(ValueError, match="train.total_steps=0 must be at least 1"):
        demo.demo(demo.build_parser().parse_args(["--steps", "0", "--data", "none"]))
    assert not (tmp_path / "none").exists()


def test_ctrl_c_in_any_job_is_one_line_and_exit_130(capsys):
    from dinomaly.distributed.entry import run_job

    def interrupted(_):
        raise KeyboardInterrupt

    assert run_job(lambda: None, interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert run_job(lambda: None, interrupted, interrupted="run it again to resume") == 130
    assert capsys.readouterr().err == "interrupted; run it again to resume\n"
    assert run_job(lambda: interrupted(None), lambda _: 0) == 130  # in check()
    assert capsys.readouterr().err == "interrupted\n"
