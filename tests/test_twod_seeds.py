"""The systems this project grew from, one config each (configs/seeds): the column U-Net learns the mask,
its mask removes everything but the column, and every seed config trains one short epoch on tiny synthetic
data and predicts (sizes, epochs and weights files overridden here, never in the configs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import models

from rsna_cspine.cli import main as cli_main
from rsna_cspine.engine import load_checkpoint
from rsna_cspine.errors import ConfigError, CSpineError
from rsna_cspine.twod.data import read_image
from rsna_cspine.twod.masking import masker_from_state, masker_state
from rsna_cspine.twod.predict import load_image_classifier
from rsna_cspine.twod.sagittal import GRADES

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO / "configs" / "seeds"
FAST = ["train.threads=1", "train.num_workers=0", "device=cpu", "train.amp=false", "train.max_minutes=0"]


@pytest.fixture(scope="module")
def sagittal(tmp_path_factory) -> Path:
    """16 phantom studies, 5 planes each, 64 px (coarse 96-px phantoms keep it quick)."""
    out = tmp_path_factory.mktemp("seeds") / "sagittal"
    assert cli_main(["synth-sagittal", str(out), "--studies", "16", "--seed", "3", "--slices", "5", "--size", "64",
                     "synth.image_size=96"]) == 0
    return out


@pytest.fixture(scope="module")
def graded_csv(sagittal: Path) -> Path:
    """The same images with the four grades cycled over the studies, so that every grade has studies in
    every split of a 16-study set (a mechanics check of the 4-class configs; learning is judged elsewhere)."""
    table = pd.read_csv(sagittal / "labels.csv")
    order = {study: GRADES[i % 4] for i, study in enumerate(sorted(table["study"].unique()))}
    table["label"] = table["study"].map(order)
    table.to_csv(sagittal / "graded.csv", index=False)
    return sagittal / "graded.csv"


@pytest.fixture(scope="module")
def column_unet(sagittal: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seeds") / "unet"
    assert cli_main(["train-2d-seg", "--config", str(SEEDS / "thesis_unet.yaml"), "--data", str(sagittal / "labels.csv"),
                     f"run_dir={run}", "data.image_size=64", "train.epochs=14", "train.batch_size=8", "train.patience=0",
                     "model.channels=[8,16,32]", "model.strides=[2,2]", "model.num_res_units=1", "optim.lr=0.01",
                     *FAST]) == 0
    return run


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seeds") / "xr"
    assert cli_main(["synth-2d", str(out), "--per-class", "12", "--seed", "1", "--size", "64",
                     "--classes", "normal,fracture,dislocation", "--dicom", "1"]) == 0
    return out


def test_column_unet_learns_the_column(column_unet: Path) -> None:
    summary = pd.read_csv(column_unet / "summary.csv")
    splits = pd.read_csv(column_unet / "splits.csv")
    assert set(splits.groupby("study")["split"].nunique()) == {1}  # a study's planes stay together
    # Baseline: calling every pixel "column" scores 2|M| / (|M| + N) on the validation masks.
    masks = np.stack([np.asarray(Image.open(p)) > 0 for p in splits.loc[splits["split"] == "val", "mask"]])
    everything = 2 * masks.sum() / (masks.sum() + masks.size)
    assert summary["val_dice"].max() > max(0.6, 2 * everything), (summary["val_dice"].tolist(), everything)
    assert summary["train_loss"].tail(3).mean() < 0.6 * summary["train_loss"].head(2).mean()
    best = load_checkpoint(column_unet / "best.pt")
    assert best["extra"]["task"] == "column_segmentation"


def test_the_mask_step_removes_every_pixel_outside_the_predicted_column(column_unet: Path, sagittal: Path) -> None:
    masker = masker_from_state(masker_state(column_unet / "best.pt"), "overlay", margin=0.0)
    table = pd.read_csv(sagittal / "labels.csv")
    middle = table[table["slice"] == 2].head(4)
    dices = []
    for row in middle.itertuples():
        image = np.repeat(np.asarray(Image.open(sagittal / row.path), dtype=np.float32)[None] / 255, 3, axis=0)
        truth = np.asarray(Image.open(sagittal / row.mask)) > 0
        predicted = masker.predict(image)
        masked = masker(image)
        assert (masked[:, ~predicted] == 0).all()
        np.testing.assert_array_equal(masked[:, predicted], image[:, predicted])
        dices.append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    assert np.mean(dices) > 0.5, dices  # what is kept is the column
    with pytest.raises(CSpineError, match="unreadable checkpoint"):
        masker_state(sagittal / "labels.csv")
    with pytest.raises(ConfigError, match="train-2d-seg"):
        masker_state(sagittal / "missing.pt")


THESIS = [
    pytest.param("thesis_resnet26.yaml", 64, [], id="resnet26"),
    pytest.param("thesis_resnet26.yaml", 64, ["model.ordinal=true", "data.study_agg=max", "data.mask_mode=crop"],
                 id="resnet26-ordinal-max-crop"),
    pytest.param("thesis_convnext_tiny.yaml", 64, [], id="convnext_tiny", marks=pytest.mark.slow),
    pytest.param("thesis_resnetrs50.yaml", 64, [], id="resnetrs50", marks=pytest.mark.slow),
    pytest.param("thesis_swin_s3_tiny.yaml", 64, [], id="swin_s3_tiny", marks=pytest.mark.slow),
    pytest.param("thesis_inception_resnet_v2.yaml", 96, [], id="inception_resnet_v2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("config", "size", "extra"), THESIS)
def test_thesis_configs_train_one_epoch_and_predict(config, size, extra, graded_csv, column_unet, tmp_path) -> None:
    run = tmp_path / "run"
    assert cli_main(["train-2d", "--config", str(SEEDS / config), "--data", str(graded_csv), f"run_dir={run}",
                     "model.pretrained_file=null", f"data.image_size={size}", "train.epochs=1", "train.batch_size=8",
                     f"data.mask_with={column_unet / 'best.pt'}", "split.val_fraction=0.25", "split.test_fraction=0.25",
                     *FAST, *extra]) == 0
    summary = pd.read_csv(run / "summary.csv")
    assert {"val_study_binary_accuracy", "val_binary_roc_auc", "val_study_loss"} <= set(summary.columns)
    report = run / "report"
    study = pd.read_csv(report / "test_study_predictions.csv")
    assert len(study) == 4 and (study["study"].str.startswith("study_")).all()  # a quarter of 16 studies
    binary = pd.read_csv(report / "test_study_binary_metrics.csv")
    assert 0.0 <= binary.loc[0, "accuracy"] <= 1.0 and binary.loc[0, "n"] == 4
    assert "studies, fracture present vs absent" in (report / "report.md").read_text()
    # The checkpoint carries the column U-Net: prediction masks the image exactly as training did.
    best = load_checkpoint(run / "best.pt")
    assert "column_mask" in best["extra"]
    predictor = load_image_classifier(run / "best.pt", "cpu")
    path = pd.read_csv(graded_csv)["path"].iloc[2]
    pixels = predictor.load(graded_csv.parent / path)
    raw = read_image(graded_csv.parent / path, 3, size, predictor.cfg.data.dicom_window)
    assert pixels.shape == (3, size, size) and not np.array_equal(pixels, raw)
    np.testing.assert_array_equal(pixels, predictor.masker(raw))
    probs = predictor.probabilities(pixels)
    assert list(probs) == list(GRADES) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    predictions = pd.read_csv(report / "test_predictions.csv")
    row = predictions[predictions["path"].str.endswith(Path(path).name)]
    if len(row):  # the single-image path repeats the batched one
        assert probs["absent"] == pytest.approx(row["prob_absent"].iloc[0], abs=1e-4)


def _torchvision_weights(name: str, path: Path) -> Path:
    """A stand-in for torchvision's ImageNet file (random weights, same keys; GoogLeNet's with its aux heads)."""
    torch.manual_seed(0)
    net = models.alexnet(weights=None) if name == "alexnet" else models.googlenet(weights=None, aux_logits=True,
                                                                                   init_weights=False)
    torch.save(net.state_dict(), path)
    return path


RADIOGRAPH = [
    pytest.param("cad_alexnet.yaml", 64, None, id="alexnet"),  # its 240 MB weights file: tests/test_twod_explain.py
    pytest.param("cad_googlenet.yaml", 64, "googlenet", id="googlenet"),
    pytest.param("efficientnet_bone.yaml", 64, None, id="efficientnet"),
    pytest.param("mobilenet_spine.yaml", 64, None, id="mobilenet"),
]


@pytest.mark.parametrize(("config", "size", "torchvision"), RADIOGRAPH)
def test_radiograph_configs_train_one_epoch_and_predict(config, size, torchvision, radiographs, tmp_path, capsys) -> None:
    weights = _torchvision_weights(torchvision, tmp_path / "w.pth") if torchvision else None
    run = tmp_path / "run"
    data = radiographs if config.startswith("cad") else radiographs / "binary.csv"
    if not config.startswith("cad"):  # the binary systems: fracture vs normal
        table = pd.read_csv(radiographs / "labels.csv")
        table[table["label"] != "dislocation"].to_csv(data, index=False)
    assert cli_main(["train-2d", "--config", str(SEEDS / config), "--data", str(data), f"run_dir={run}",
                     f"model.pretrained_file={weights if weights else 'null'}", f"data.image_size={size}",
                     "train.epochs=1", "train.batch_size=8", "data.in_memory=true", *FAST]) == 0
    metrics = pd.read_csv(run / "report" / "test_metrics.csv")
    assert metrics.loc[0, "n"] >= 3
    image = next((radiographs / "fracture").glob("*.png"))
    cam, saliency = tmp_path / "cam.png", tmp_path / "saliency.png"
    capsys.readouterr()
    assert cli_main(["predict-2d", str(image), "--checkpoint", str(run / "best.pt"), "--cam", str(cam),
                     "--saliency", str(saliency), "--device", "cpu"]) == 0
    probs = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    expected = ["dislocation", "fracture", "normal"] if config.startswith("cad") else ["fracture", "normal"]
    assert list(probs) == expected and sum(map(float, probs.values())) == pytest.approx(1.0, abs=1e-5)
    assert cam.stat().st_size > 1000 and saliency.stat().st_size > 1000
    if torchvision:  # the ImageNet trunk was loaded (and its statistics used), the head is new
        predictor = load_image_classifier(run / "best.pt", "cpu")
        assert predictor.cfg.model.head == "fc2" and predictor.model.input_norm.mean.flatten().tolist() == \
            pytest.approx([0.485, 0.456, 0.406])
