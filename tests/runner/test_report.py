import math

from clinadapt.runner.report import published_comparison


def test_published_comparison_shows_the_gap():
    rows = [
        {
            "dataset": "breastmnist",
            "backbone": "resnet18_28",
            "shots": "all",
            "auc": 0.88,
            "acc": 0.85,
        },
        {
            "dataset": "breastmnist",
            "backbone": "resnet18_28",
            "shots": "10",
            "auc": 0.7,
            "acc": 0.6,
        },
        {"dataset": "other", "backbone": "x", "shots": "all", "auc": 0.5, "acc": 0.5},
    ]
    table = published_comparison(
        rows, {("breastmnist", "resnet18_28"): {"auc": 0.901, "acc": 0.863}}
    )
    lines = table.splitlines()
    assert (
        len(lines) == 3
    )  # header, rule, one matching row (few-shot and unpublished rows left out)
    assert "| 0.880 | 0.901 | -0.021 | 0.850 | 0.863 |" in lines[2]


def _record(auc, undefined=None, seed=0):
    from clinadapt.runner.records import build_record

    test = {"auc": auc, "acc": 0.5, "balanced_accuracy": 0.5}
    if undefined:
        test["undefined"] = {"auc": undefined}
    return build_record(
        "frozen",
        {"backbone": "b", "weights": "none", "method": "knn", "shots": "all", "seed": seed},
        run={"id": str(seed), "options": {"dataset": "d", "method": "knn", "seed": seed}},
        dataset={"name": "d", "provenance": {}},
        backbone={"is_pretrained": False},
        preprocessing={"resize": "nearest", "source_size": 28, "input_size": 32},
        method={"fitted_parameters": 0},
        labels_used={"train": 4, "val": 0, "total": 4},
        metrics={"test": test},
        timings={"setup_s": 1.0, "run_s": 0.1, "setup_key": "k"},
    )


def test_an_undefined_metric_is_shown_with_its_reason_never_as_nan():
    from clinadapt.runner.report import markdown_table, summarise

    table = markdown_table(summarise([_record(math.nan, "only one class in the labels")]))
    assert "n/a (only one class in the labels)" in table and "nan" not in table
    mixed = markdown_table(
        summarise([_record(0.8, seed=0), _record(math.nan, "only one class in the labels", 1)])
    )
    assert "0.800" in mixed and "1 of 2 seeds n/a: only one class in the labels" in mixed


def test_metric_columns_are_the_record_task_s_report_metrics(monkeypatch):
    from clinadapt.runner.report import markdown_table, summarise
    from clinadapt.tasks import TASKS

    record = {**_record(0.75), "task": "classification"}
    assert "| AUC | ACC | balanced acc. |" in markdown_table(summarise([record]))
    monkeypatch.setattr(TASKS.get("classification"), "report_metrics", ("acc", "auc"))
    table = markdown_table(summarise([record]))
    assert "| ACC | AUC | protocol |" in table and "balanced acc." not in table
    assert "| 0.500 ± 0.000 | 0.750 ± 0.000 |" in table
