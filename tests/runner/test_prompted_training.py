"""Trained prompted runs (sam_decoder, sam_lora, sam_full) with a tiny random SAM on tiny
synthetic folders: what trains and is recorded, the adapter and merged exports, resume, volumes,
and the options they refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinadapt.adapt.sam_checkpoint import load_sam_adapted
from clinadapt.backbones.sam import load_sam, preprocess
from clinadapt.cli import main
from clinadapt.errors import ConfigError
from clinadapt.runner.experiment import run_experiment

from .test_prompted_runs import config, pairs, run, sam_weights, volumes  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"epochs": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def lora_run(pairs, sam_weights, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("runs") / "lora"
    cfg = config(pairs, sam_weights, "sam_lora", r=2, train=TRAIN)
    record, predictions = run(cfg, run_dir)
    (run_dir / "record.json").write_text(json.dumps(record))  # as `clinadapt train` does
    return cfg, run_dir, record, predictions


def test_a_trained_run_records_its_training_and_test_prompts(lora_run):
    _, run_dir, record, predictions = lora_run
    method = record["method"]
    assert method["kind"] == "prompted" and method["selected"]["trains"].startswith("LoRA")
    assert len(method["selected"]["target_modules"]) == 8
    assert 0 < method["fitted_parameters"] < 0.5 * record["backbone"]["parameters"]
    support = record["shots"]["support_size"]
    assert support == record["dataset"]["split_sizes"]["train"]  # fewer than 10 shots: all
    assert record["labels_used"]["train"] == support and record["labels_used"]["val"] > 0
    assert [row["epoch"] for row in record["history"]] == [1, 2]
    assert "dice" in record["metrics"]["val"] and record["prompts"]["oracle"] is True
    assert record["timings"]["train_s"] > 0
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()
    assert len(predictions) == record["metrics"]["test"]["n_cases"]


def test_the_adapter_rebuilds_the_trained_model(lora_run, pairs):  # noqa: F811
    cfg, run_dir, _, _ = lora_run
    segmenter, method = load_sam_adapted(run_dir / "adapter")
    assert method.config.r == 2
    sam = segmenter.sam
    image = np.asarray(__import__("PIL.Image").Image.open(next((pairs / "images").iterdir())))
    x, frame = preprocess(image, sam.image_size)
    box = frame.boxes([1, 1, 8, 8])
    base = load_sam(cfg.weights)
    with torch.no_grad():
        trained = sam.predict_masks(sam.embed_image(x[None]), boxes=box)
        untrained = base.predict_masks(base.embed_image(x[None]), boxes=box)
    assert not torch.allclose(trained, untrained, atol=1e-4)
    # a second load gives the same model
    again, _ = load_sam_adapted(run_dir / "adapter")
    with torch.no_grad():
        same = again.sam.predict_masks(again.sam.embed_image(x[None]), boxes=box)
    assert torch.equal(trained, same)


def test_merged_export_is_a_checkpoint_that_segments_like_the_run(lora_run, pairs, capsys):  # noqa: F811
    _, run_dir, _, _ = lora_run
    assert main(["export", str(run_dir), "--merge"]) == 0
    out = run_dir / "export-merged"
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "MODEL_CARD.md"}
    card = (out / "MODEL_CARD.md").read_text()
    assert "segmenter" in card and "Dice" in card and "oracle prompts" in card
    merged = load_sam(out)
    segmenter, _ = load_sam_adapted(run_dir / "adapter")
    x = torch.rand(1, 3, merged.image_size, merged.image_size)
    box = torch.tensor([[2.0, 3.0, 40.0, 50.0]])
    with torch.no_grad():
        want = segmenter.sam.predict_masks(segmenter.sam.embed_image(x), boxes=box)
        got = merged.predict_masks(merged.embed_image(x), boxes=box)
    assert torch.allclose(got, want, atol=1e-4)
    assert main(["export", str(run_dir)]) == 0
    assert (run_dir / "export" / "adapter.safetensors").is_file()


def test_a_finished_run_resumes_without_training_again(lora_run):
    cfg, run_dir, record, _ = lora_run
    import dataclasses

    again = run_experiment(dataclasses.replace(cfg, resume=True), run_dir=run_dir, progress=False)
    assert again["history"] == record["history"]
    assert again["metrics"]["test"]["dice"] == pytest.approx(record["metrics"]["test"]["dice"])


@pytest.mark.parametrize("method", ["sam_decoder", "sam_full"])
def test_decoder_and_full_runs_train_what_they_name(method, pairs, sam_weights, tmp_path):  # noqa: F811
    record, _ = run(config(pairs, sam_weights, method, train=TRAIN), tmp_path / method)
    trained = record["method"]["fitted_parameters"]
    total = record["backbone"]["parameters"]
    assert (trained == total) == (method == "sam_full")
    assert np.isfinite(record["metrics"]["test"]["dice"])


def test_volumes_train_on_their_slices(volumes, sam_weights, tmp_path):  # noqa: F811
    cfg = config(volumes, sam_weights, "sam_decoder", train={"epochs": 1, "batch_size": 4})
    record, predictions = run(cfg, tmp_path / "vol")
    assert record["shots"]["support_size"] == 1  # one training volume, its slices the batches
    assert predictions[0].ndim == 3
    assert record["history"][0]["train_loss"] > 0


def test_trained_methods_need_a_run_folder_and_accept_training_options(pairs, sam_weights):  # noqa: F811
    with pytest.raises(ConfigError, match="trains a model: pass run_dir"):
        run_experiment(config(pairs, sam_weights, "sam_decoder"), run_dir=None)
    with pytest.raises(ConfigError, match="training options only apply"):
        run_experiment(config(pairs, sam_weights, "sam_box", train={"epochs": 1}))


def test_a_zero_shot_run_has_nothing_to_export(pairs, sam_weights, tmp_path, capsys):  # noqa: F811
    record, _ = run(config(pairs, sam_weights, "sam_box"), tmp_path / "zs")
    (tmp_path / "zs" / "record.json").write_text(json.dumps(record))
    assert main(["export", str(tmp_path / "zs")]) == 2
    assert "zero-shot prompted run: it trained nothing" in capsys.readouterr().err


def test_the_cli_trains_prompted_methods_with_train_not_run(pairs, sam_weights, tmp_path, capsys):  # noqa: F811
    common = ["--dataset", str(pairs), "--backbone", "litemedsam", "--weights", str(sam_weights)]
    common += ["--method", "sam_decoder", "train.epochs=1", "--quiet"]
    assert main(["run", *common]) == 2
    assert "clinadapt train --out" in capsys.readouterr().err
    assert main(["train", *common, "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "record.json").is_file()
    assert "dice" in capsys.readouterr().out


def test_frozen_encoder_runs_share_test_embeddings_through_the_cache(pairs, sam_weights, tmp_path):  # noqa: F811
    import dataclasses

    cache = str(tmp_path / "cache")
    box = dataclasses.replace(config(pairs, sam_weights, "sam_box"), cache_dir=cache)
    first, first_masks = run(box)
    again, again_masks = run(box)
    point, _ = run(dataclasses.replace(box, method="sam_point"))
    prompted = first["prompts"]["prompted_images"]
    assert first["embedding_cache"] == {"hits": 0, "misses": prompted}
    assert again["embedding_cache"] == {"hits": prompted, "misses": 0}
    assert point["embedding_cache"]["hits"] == prompted  # same images, another prompt
    assert all(np.array_equal(a, b) for a, b in zip(first_masks, again_masks, strict=True))
    full = dataclasses.replace(box, method="sam_full", train=TRAIN)
    trained, _ = run(full, tmp_path / "full")
    assert trained["embedding_cache"] == {"hits": 0, "misses": 0}  # its encoder changed


def test_encoder_training_defaults_to_small_accumulated_batches(pairs, sam_weights):  # noqa: F811
    from clinadapt.runner.prompted_train import prompted_train_config
    from clinadapt.tasks import TASKS

    task = TASKS.get("segmentation")
    decoder = prompted_train_config(config(pairs, sam_weights, "sam_decoder"), task)
    full = prompted_train_config(config(pairs, sam_weights, "sam_full"), task)
    given = prompted_train_config(config(pairs, sam_weights, "sam_lora", train=TRAIN), task)
    assert (decoder.batch_size, decoder.grad_accumulation) == (8, 1)
    assert (full.batch_size, full.grad_accumulation) == (2, 4)
    assert (given.batch_size, given.grad_accumulation) == (2, 1)  # a given batch size is kept
