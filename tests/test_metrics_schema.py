"""metrics.json's schema (dinomaly/metrics.schema.json): records of every job pass, broken ones fail with the place.

The real outputs are validated where they are made: tests/test_training.py (train), tests/test_tuning.py (a
trial's metrics.json) and tests/test_evaluate.py (evaluate); here no Ray runs.
"""

import json

import jsonschema
import pytest

from dinomaly.metrics import METRIC_NAMES
from dinomaly.results import SCHEMA_FILE, SCHEMA_VERSION, MetricsRecord, metrics_schema, validate_metrics

ROWS = [{"class": "nut", **dict.fromkeys(METRIC_NAMES, 0.5)}, {"class": "mean", **dict.fromkeys(METRIC_NAMES, 0.5)}]
THRESHOLDS = {"image_f1_optimal": 0.3, "image_normal_quantile": 0.4, "normal_quantile": 0.99,
              "per_class": {"nut": {"image_f1_optimal": 0.3, "image_normal_quantile": 0.4}}}


def train_record(**fields):
    values = dict(run="r", setting="unified", step=40, describes="last", checkpoint_uri="/runs/r/checkpoint_0000040")
    return MetricsRecord.from_rows("train", ROWS, THRESHOLDS, **{**values, **fields}).to_dict()


def tune_record(**fields):
    values = dict(sweep="s", trial_id="t1", status="completed", objective=0.5, objective_kind="labelled", mode="max",
                  evaluation=1, step=2, steps_trained=4, describes="best", checkpoint_uri="/s/t1/c", params={})
    return MetricsRecord.from_rows("tune", ROWS, THRESHOLDS, **{**values, **fields}).to_dict()


def test_the_schema_is_a_valid_json_schema_shipped_with_the_package():
    jsonschema.Draft202012Validator.check_schema(metrics_schema())
    assert SCHEMA_FILE.parent.name == "dinomaly" and json.loads(SCHEMA_FILE.read_text())["properties"][
        "schema_version"] == {"const": SCHEMA_VERSION}


def test_records_of_each_job_pass_and_nan_is_written_as_null():
    record = train_record()
    assert record["schema_version"] == SCHEMA_VERSION and record["job"] == "train"
    validate_metrics(record)
    validate_metrics(tune_record())
    validate_metrics(tune_record(objective_kind="holdout_loss", mode="min", classes={}))
    nan = MetricsRecord.from_rows("train", [{"class": "mean", "image_auroc": float("nan")}], None, run="r",
                                  setting="unified", step=1, describes="last").to_dict()
    assert nan["mean"] == {"image_auroc": None}
    validate_metrics(nan)


@pytest.mark.parametrize("breaks, where", [
    (lambda r: r.pop("schema_version"), r"\(top level\)"),
    (lambda r: r.update(schema_version=2), "schema_version"),
    (lambda r: r.update(job="predict"), "job"),
    (lambda r: r["mean"].update(image_auroc="high"), "mean/image_auroc"),
    (lambda r: r["classes"]["nut"].update(auroc=0.5), "classes/nut"),
    (lambda r: r.update(thresholds=[0.3]), "thresholds"),
    (lambda r: r.pop("step"), r"\(top level\)"),
    (lambda r: r.update(describes="first"), "describes"),
])
def test_a_broken_train_record_fails_naming_the_place(breaks, where):
    record = train_record()
    breaks(record)
    with pytest.raises(ValueError, match=f"schema version 1 at {where}"):
        validate_metrics(record)


def test_job_specific_fields_are_required():
    record = tune_record()
    record.pop("objective")
    with pytest.raises(ValueError, match="'objective' is a required property"):
        validate_metrics(record)
    evaluate = MetricsRecord.from_rows("evaluate", ROWS, THRESHOLDS, data="/d").to_dict()
    with pytest.raises(ValueError, match="'model' is a required property"):
        validate_metrics(evaluate)
