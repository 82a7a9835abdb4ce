"""``clinadapt export``: a trained run as files that plain timm code loads, with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from clinadapt.errors import ClinadaptError


def export_run(
    run_dir: str | Path, out_dir: str | Path | None = None, *, merge: bool = False
) -> Path:
    """Write the adapter (default) or one merged checkpoint (``merge``) plus MODEL_CARD.md."""
    from clinadapt.backbones import get_spec
    from clinadapt.engine.checkpoint import save_safetensors
    from clinadapt.runner.predict import load_run

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / ("export-merged" if merge else "export")
    if out.exists() and any(out.iterdir()):
        raise ClinadaptError(f"{out} is not empty; choose another --out or remove it")
    if _is_prompted(run_dir):
        return _export_prompted(run_dir, out, merge)
    record, model, method, preprocess = load_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        spec = get_spec(record["config"]["backbone"])
        if spec.library != "timm":
            raise ClinadaptError(
                f"--merge writes timm checkpoints; {spec.name} is a {spec.library} model. "
                "Export without --merge instead"
            )
        plain = method.merge(model)
        state = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
        save_safetensors(state, out / "model.safetensors")
        config = {
            "architecture": spec.model_name,
            "create_model_kwargs": {
                **spec.kwargs,
                **_local_kwargs(record),
                "num_classes": record["dataset"]["num_classes"],
            },
            **_preprocessing(record, preprocess),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        for path in (run_dir / "adapter").iterdir():
            shutil.copy2(path, out / path.name)
    (out / "MODEL_CARD.md").write_text(model_card(record, merged=merge))
    return out


def _is_prompted(run_dir: Path) -> bool:
    try:
        record = json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError):
        return False  # load_run says what is wrong
    return isinstance(record, dict) and record.get("method", {}).get("kind") == "prompted"


def _export_prompted(run_dir: Path, out: Path, merge: bool) -> Path:
    """A trained SAM: its adapter, or (``merge``) a segment-anything checkpoint for load_sam."""
    from clinadapt.adapt.sam_checkpoint import export_merged, load_sam_adapted

    record = json.loads((run_dir / "record.json").read_text())
    if not (run_dir / "adapter").is_dir():
        raise ClinadaptError(
            f"{run_dir} is a zero-shot prompted run: it trained nothing, so there is nothing to "
            "export; its model is the checkpoint it was given"
        )
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        segmenter, method = load_sam_adapted(run_dir / "adapter")
        export_merged(segmenter, method, str(record["config"]["weights"]), out)
    else:
        for path in (run_dir / "adapter").iterdir():
            shutil.copy2(path, out / path.name)
    (out / "MODEL_CARD.md").write_text(model_card(record, merged=merge))
    return out


def _local_kwargs(record: dict[str, Any]) -> dict[str, Any]:
    """Extra timm kwargs that local weights needed (e.g. pad_type='same'), from their config."""
    from clinadapt.backbones.weights import resolve_local_weights

    weights = record["config"]["weights"]
    if weights in ("pretrained", "none"):
        return {}
    kwargs = resolve_local_weights(Path(weights)).create_kwargs
    return {k: v for k, v in kwargs.items() if k != "num_classes"}


def _preprocessing(record: dict[str, Any], preprocess: Any) -> dict[str, Any]:
    described = preprocess.describe()
    return {
        "input_size": described.get("input_size"),
        "mean": described.get("mean"),
        "std": described.get("std"),
        "resize": described.get("resize"),
        "source_size": record["preprocessing"].get("source_size"),
        "labels": record["dataset"]["labels"],
        "task": record["dataset"]["task"],
    }


def model_card(record: dict[str, Any], *, merged: bool) -> str:
    """A short card: data, method, metrics, intended use and limits, from the run record."""
    from clinadapt.runner.report import METRIC_LABELS
    from clinadapt.tasks import TASKS

    labels = {**METRIC_LABELS, "ece": "Expected calibration error"}

    cfg, data, method = record["config"], record["dataset"], record["method"]
    task = TASKS.get(record.get("task", "classification"))
    prompted = method.get("kind") == "prompted"
    test = record["metrics"]["test"]
    ci = record["metrics"].get("test_ci95", {})

    def metric(name: str) -> str:
        bounds = ci.get(name)
        value = test.get(name)
        text = "n/a" if value is None else f"{value:.3f}"
        return text + (f" (95% CI {bounds[0]:.3f}–{bounds[1]:.3f})" if bounds else "")

    verified = data["provenance"].get("verified")
    lines = [
        f"# {data['name']} {'segmenter' if task.dense_targets else 'classifier'}: "
        f"{cfg['backbone']} adapted with {cfg['method']}",
        "",
        "## Data",
        f"- Dataset: {data['name']} ({data['task']}, {data['num_classes']} classes: "
        f"{', '.join(data['labels'])}); splits {data['split_sizes']}.",
        f"- Training examples used: {record['shots']['support_size']} "
        f"(shots: {record['shots']['requested']} per class, seed {cfg['seed']}).",
        f"- Data checksum matched the official release: {verified}.",
        f"- Input protocol: {record['preprocessing'].get('resize')} from "
        f"{record['preprocessing'].get('source_size')} px to "
        f"{record['preprocessing'].get('input_size')} px.",
        "",
        "## Method",
        f"- Backbone {cfg['backbone']} with weights `{cfg['weights']}`"
        + ("" if record["backbone"]["is_pretrained"] else " (random initialisation)")
        + ".",
        f"- {cfg['method']}: {method['fitted_parameters']:,} trainable parameters "
        f"({method.get('trainable_percent_of_backbone', 0):.2f}% of the backbone); "
        f"best epoch {method['selected'].get('best_epoch')} chosen on validation.",
        f"- This export: {_what(merged, prompted)}.",
        *(
            [f"- Test prompts: {record['prompts']['how']} (oracle prompts from the ground truth)."]
            if prompted
            else []
        ),
        "",
        "## Test metrics (evaluated once, after model selection on validation)",
        *(f"- {labels.get(m, m)} {metric(m)}" for m in _card_metrics(task)),
        "",
        "## Intended use and limits",
        "- Research use: comparing adaptation methods on this dataset. Not a medical device and "
        "not validated for clinical decisions.",
        "- Performance was measured on one test split of one source; expect it to drop under "
        "scanner, site or population shift. Check calibration before using probabilities.",
        "- Inputs must follow the same protocol (size, resize mode, normalisation) as above.",
    ]
    if merged and prompted:
        lines += [
            "",
            "## Loading",
            "```python",
            "from clinadapt.backbones.sam import load_sam",
            "model = load_sam('.')  # this folder; or: clinadapt segment IMAGE --weights .",
            "```",
        ]
    elif merged:
        lines += [
            "",
            "## Loading",
            "```python",
            "import json, timm, safetensors.torch",
            "cfg = json.load(open('config.json'))",
            "model = timm.create_model(cfg['architecture'], **cfg['create_model_kwargs'])",
            "model.load_state_dict(safetensors.torch.load_file('model.safetensors'))",
            "```",
        ]
    return "\n".join(lines) + "\n"


def _what(merged: bool, prompted: bool) -> str:
    if not merged:
        return "adapter weights only"
    return "one merged segment-anything checkpoint" if prompted else "one merged timm checkpoint"


def _card_metrics(task: Any) -> tuple[str, ...]:
    """The task's report metrics, and calibration for classifiers."""
    return task.report_metrics + (() if task.dense_targets else ("ece",))
