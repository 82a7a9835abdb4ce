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
