import math

from clinadapt.runner.report import published_comparison

OVERLAYS = ("best", "median", "worst")


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
        {
            "dataset": "pneumoniamnist",
            "backbone": "resnet18_28",
            "shots": "all",
            "seeds": 3,
            "auc": 0.95,
            "auc_sd": 0.0123,
            "acc": 0.86,
            "acc_sd": 0.02,
        },
    ]
    published = {
        ("breastmnist", "resnet18_28"): {"auc": 0.901, "acc": 0.863},
        ("pneumoniamnist", "resnet18_28"): {"auc": 0.944, "acc": 0.854},
    }
    lines = published_comparison(rows, published).splitlines()
    # header, rule, the matching rows (few-shot and unpublished rows left out)
    assert len(lines) == 4
    assert "| 1 | 0.880 | 0.901 | -0.021 | 0.850 | 0.863 |" in lines[2]
    assert "| 3 | 0.950 ± 0.012 | 0.944 | +0.006 | 0.860 ± 0.020 | 0.854 |" in lines[3]


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


def _seg_record(
    dice,
    seed=0,
    *,
    method="head",
    weights="pretrained",
    hd95=12.3,
    undefined_hd95=0,
    dataset="kvasir_seg",
    slices=None,
    size=224,
):
    from clinadapt.runner.records import build_record

    test = {
        "dice": dice,
        "iou": dice - 0.1,
        "hd95": hd95,
        "nsd": 0.7,
        "n_cases": 200,
        "n_undefined": {"dice": 0, "iou": 0, "hd95": undefined_hd95, "nsd": 0},
        "distance_unit": "pixel",
        "nsd_tolerance": 2.0,
        "undefined": {},
    }
    ci = {"dice": [dice - 0.02, dice + 0.02], "hd95": [hd95 - 1.0, hd95 + 1.0], "nsd": [0.6, 0.8]}
    return build_record(
        "finetune",
        {"backbone": "mobilenetv2_100", "weights": weights, "method": method, "shots": "10"}
        | {"seed": seed},
        run={"id": f"{method}{weights}{seed}", "options": {"dataset": dataset, "seed": seed}},
        task="segmentation",
        dataset={"name": dataset, "provenance": {}},
        backbone={"is_pretrained": weights != "none"},
        preprocessing={
            "input_size": 224,
            "resize": "linear",
            "size": size,
            "image": "bilinear/trilinear (antialiased when a 2D image shrinks)",
            "mask": "nearest",
            "slices": slices,
            "precision": "fp32",
        },
        method={"fitted_parameters": 5000 if method == "head" else 90000},
        labels_used={"train": 10, "val": 5, "total": 15},
        metrics={"test": test, "test_ci95": ci},
        overlays={w: f"overlays/{w}.png" for w in ("best", "median", "worst")},
        timings={"setup_s": 2.0, "run_s": 3.0, "setup_key": "s"},
    )


def _write(path, record, pictures=("best", "median", "worst")):
    """A bench record X.json with its run folder X holding the overlay pictures."""
    import json

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    folder = path.parent / path.stem if path.name != "record.json" else path.parent
    for which in pictures:
        (folder / "overlays").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (255, 0, 0)).save(folder / "overlays" / f"{which}.png")


def test_segmentation_rows_beside_classification_rows():
    from clinadapt.runner.report import header, markdown_table, summarise, table_rows

    rows = summarise([_record(0.75), _seg_record(0.8, 0), _seg_record(0.9, 1, hd95=14.3)])
    columns = header(rows)
    assert columns[6:13] == [
        "labelled images",
        "AUC",
        "ACC",
        "balanced acc.",
        "Dice",
        "HD95",
        "NSD",
    ]
    cells = {row[0]: dict(zip(columns, row, strict=True)) for row in table_rows(rows)}
    seg, cls = cells["kvasir_seg"], cells["d"]
    assert seg["AUC"] == "-" and cls["Dice"] == "-" and cls["AUC"].startswith("0.750")
    assert seg["Dice"].startswith("0.850 ± 0.071 [")
    assert seg["HD95"].startswith("13.30 ± 1.41 [") and seg["HD95"].endswith(" px")
    _, high = (float(v) for v in seg["HD95"].split("[")[1].split("]")[0].split(", "))
    assert high > 14.3  # a distance's interval is not clipped to 1
    assert seg["labelled images"] == "15" and seg["protocol"] == "linear to 224"
    assert cls["protocol"] == "nearest 28->32"
    assert "nan" not in markdown_table(rows).lower()


def test_segmentation_protocol_names_the_size_and_axial_slices():
    from clinadapt.runner.report import summarise

    [row] = summarise([_seg_record(0.8, slices="axial slices through a 2D backbone")])
    assert row["protocol"] == "linear to 224, axial slices"
    [row] = summarise([_seg_record(0.8, size=[256, 320])])
    assert row["protocol"] == "linear to 256x320"


def test_cases_where_a_metric_is_undefined_are_counted_in_the_cell():
    from clinadapt.runner.report import markdown_table, summarise

    one = markdown_table(summarise([_seg_record(0.8, undefined_hd95=3)]))
    assert "12.30 ± 0.00 [11.30, 13.30] px (3/200 cases undefined)" in one
    assert one.count("cases undefined") == 1  # Dice and NSD were defined in every case
    two = markdown_table(
        summarise([_seg_record(0.8, 0, undefined_hd95=3), _seg_record(0.8, 1, undefined_hd95=2)])
    )
    assert "(2.5/200 cases undefined, mean over 2 seeds)" in two
    everywhere = _seg_record(0.8, hd95=math.nan, undefined_hd95=200)
    everywhere["metrics"]["test"]["undefined"] = {
        "mean_fg_hd95.mean": "undefined in every case: empty ground truth or prediction"
    }
    table = markdown_table(summarise([everywhere]))
    assert "n/a (undefined in every case: empty ground truth or prediction)" in table
    assert "nan" not in table.lower()


def test_report_of_mixed_tasks_notes_overlays_and_plots(tmp_path, caplog):
    from clinadapt.runner.report import build_report

    runs = tmp_path / "runs"
    for weights in ("pretrained", "none"):
        for method in ("linear", "bitfit"):
            rec = _record(0.7 if weights == "none" else 0.8)
            rec["config"] |= {"weights": weights, "method": method}
            rec["backbone"]["is_pretrained"] = weights != "none"
            rec["method"]["fitted_parameters"] = 10 if method == "linear" else 100
            _write(runs / "cls" / f"{weights}_{method}.json", rec, pictures=())
    for weights in ("pretrained", "none"):
        for method in ("head", "lora"):
            for seed in (0, 1):
                rec = _seg_record(0.6 if weights == "none" else 0.8, seed, method=method)
                rec["config"] |= {"weights": weights, "shots": "all"}
                rec["backbone"]["is_pretrained"] = weights != "none"
                path = runs / "seg" / f"{weights}_{method}_{seed}.json"
                _write(path, rec, pictures=("best", "worst") if method == "lora" else OVERLAYS)
    _write(runs / "single" / "record.json", _seg_record(0.5, dataset="other_seg", method="x"))
    with caplog.at_level("WARNING"):
        paths = build_report(runs)
    assert (
        "median picture of kvasir_seg / mobilenetv2_100" in caplog.text
    )  # lora's is missing: skipped with a warning
    out = runs / "report"
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "| AUC | ACC | balanced acc. | Dice | HD95 | NSD |" in md
    assert "AUC and ACC follow the MedMNIST evaluator" in md
    assert "NSD tolerance: 2 pixels" in md and "HD95: lower is better" in md
    assert "(k/N cases undefined)" in md and "mean number per seed" in md
    title = "kvasir_seg / mobilenetv2_100 / pretrained / head / all labels (seed 0)"
    assert f"### {title}: best, median, worst test case" in md
    assert f"<h3>{title}: best, median, worst test case</h3>" in page
    lora = "kvasir_seg / mobilenetv2_100 / none (untrained control) / lora / all labels (seed 0)"
    assert f"{lora}: best, worst test case" in md
    assert "other_seg / mobilenetv2_100 / pretrained / x / 10 shots (seed 0)" in md
    copied = sorted(p.relative_to(out).as_posix() for p in (out / "overlays").iterdir())
    assert len(copied) == 3 + 3 + 2 + 2 + 3  # a missing median for both lora rows
    for picture in copied:
        assert f"src='{picture}'" in page and f"]({picture})" in md
    assert "overlays/kvasir_seg_mobilenetv2_100_pretrained_head_all-labels_best.png" in copied
    plots = {name for name in paths if name not in ("markdown", "html")}
    assert plots == {
        "label_efficiency_d_b",
        "label_efficiency_kvasir_seg_mobilenetv2_100",
        "label_efficiency_other_seg_mobilenetv2_100",
        "pretrained_vs_control",
        "pretrained_vs_control_dice",
        "auc_vs_parameters",
        "dice_vs_parameters",
    }


def test_each_plot_shows_one_metric_named_on_its_axis(tmp_path, monkeypatch):
    import matplotlib.figure

    from clinadapt.runner import report

    saved = []
    real = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):
        axes = [ax for ax in fig.axes if ax.get_ylabel()]
        saved.append((path.name, {ax.get_ylabel() for ax in axes}, axes))
        return real(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    rows = report.summarise(
        [
            *(_record(0.8, seed=s) for s in (0, 1)),
            *(
                _seg_record(0.8, s, method=m, weights=w)
                for s in (0, 1)
                for m in ("head", "lora")
                for w in ("pretrained", "none")
            ),
        ]
    )
    for row in rows:
        row["shots"] = "all"
    report.plot_label_efficiency(rows, tmp_path)
    report.plot_pretrained_vs_control(rows, tmp_path)
    report.plot_metric_vs_parameters(rows, tmp_path)
    labels = {name: ylabels for name, ylabels, _ in saved}
    assert labels["label_efficiency_d_b.png"] == {"test AUC (mean ± sd over seeds)"}
    assert labels["label_efficiency_kvasir_seg_mobilenetv2_100.png"] == {
        "test Dice (mean ± sd over seeds)"
    }
    assert labels["pretrained_vs_control_dice.png"] == {"test Dice, all labels (95% bootstrap CI)"}
    assert labels["dice_vs_parameters.png"] == {"test Dice (mean ± sd over seeds)"}
    assert "auc_vs_parameters.png" not in labels  # one classification method, nothing to compare
    for name, _, axes in saved:
        seg = "kvasir" in name or "dice" in name
        [ax] = axes
        chance = [line for line in ax.get_lines() if list(line.get_ydata()) == [0.5, 0.5]]
        assert bool(chance) is not seg, name
        if name.startswith("label_efficiency"):
            want = "labelled images" if seg else "labelled examples per class"
            assert ax.get_xlabel() == want
        if name == "pretrained_vs_control_dice.png":
            assert ax.get_ylim() != (0.4, 1.0)


def test_notes_explain_only_the_tasks_present():
    from clinadapt.runner.report import notes, summarise

    seg = [_seg_record(0.8)]
    seg[0]["metrics"]["test"] |= {"distance_unit": "mm", "nsd_tolerance": 1.5}
    text = " ".join(notes(summarise(seg), seg))
    assert "AUC and ACC" not in text and "NSD tolerance: 1.5 mm)" in text
    cls = [_record(0.7)]
    text = " ".join(notes(summarise(cls), cls))
    assert "AUC and ACC" in text and "HD95" not in text
    both = [*seg, _seg_record(0.7, dataset="other_seg")]
    text = " ".join(notes(summarise(both), both))
    assert "NSD tolerance: 1.5 mm for kvasir_seg; 2 pixels for other_seg)" in text
