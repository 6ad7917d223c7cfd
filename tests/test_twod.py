"""2D image-folder mode: synthetic generator, index (folders / CSV), image reading, split, metrics,
training through the stage-2 loop (learning, resume), reports, predict-2d and Grad-CAM."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rsna_cspine.training.loop as loop_module
from rsna_cspine.cli import main as cli_main
from rsna_cspine.config import load_config
from rsna_cspine.engine import load_checkpoint
from rsna_cspine.errors import ConfigError, CSpineError, LayoutError
from rsna_cspine.cls.model import last_stage_name
from rsna_cspine.twod.config import TwoDConfig, TwoDSplitConfig
from rsna_cspine.twod.data import check_images, index_images, read_image
from rsna_cspine.twod.gradcam import image_gradcam
from rsna_cspine.twod.predict import load_image_classifier
from rsna_cspine.twod.report import METRIC_COLUMNS, classification_metrics, positive_index, write_split_report
from rsna_cspine.twod.split import split_indices
from rsna_cspine.twod.synth import Synth2DConfig, make_radiograph, write_dicom, write_image_folder
from rsna_cspine.twod.train import train_2d
from tests.paths import REPO_ROOT

torch.set_num_threads(1)

SIZE = 64
PER_CLASS = 90
N_DICOM = 2  # per class: the DICOM path goes through training too


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth2d") / "data"
    assert cli_main(["synth-2d", str(out), "--per-class", str(PER_CLASS), "--seed", "0", "--size", str(SIZE),
                     "--dicom", str(N_DICOM)]) == 0
    return out


def _tiny_config(run_dir: Path, data: Path, **train: object) -> TwoDConfig:
    """The shipped CPU config on the test images; ``train`` sets fields of the ``train:`` section."""
    cfg = load_config(TwoDConfig, REPO_ROOT / "configs" / "twod_cpu.yaml", [f"data.image_size={SIZE}", "train.threads=1"],
                      values={"run_dir": run_dir, "data": {"root": data}})
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


@pytest.fixture(scope="module")
def trained_run(image_folder, tmp_path_factory) -> Path:
    """One CPU training run through the CLI, shared by the learning, report, predict and Grad-CAM tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "learn"
    code = cli_main(["train-2d", "--config", str(REPO_ROOT / "configs" / "twod_cpu.yaml"), "--data", str(image_folder),
                     f"run_dir={run_dir}", f"data.image_size={SIZE}", "train.threads=1", "train.epochs=18",
                     "train.patience=0", "train.max_minutes=0"])
    assert code == 0
    return run_dir


# ------------------------------------------------------------------------------------------ generator


def test_generator_is_deterministic_per_seed_and_per_image(tmp_path) -> None:
    cfg = Synth2DConfig(per_class=3, seed=5, classes=("normal", "fracture", "dislocation"), size=64, dicom_per_class=1)
    first = write_image_folder(tmp_path / "a", cfg)
    again = write_image_folder(tmp_path / "b", cfg)
    assert first.equals(again)
    assert sorted(first["label"].unique()) == ["dislocation", "fracture", "normal"]
    assert (first["path"].str.endswith(".dcm")).sum() == 3
    for rel in first["path"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # More images per class leave the first ones as they were; another seed changes them.
    more = write_image_folder(tmp_path / "c", Synth2DConfig(**{**cfg.__dict__, "per_class": 5}))
    assert len(more) == 15
    assert (tmp_path / "a/fracture/fracture_0002.png").read_bytes() == (tmp_path / "c/fracture/fracture_0002.png").read_bytes()
    write_image_folder(tmp_path / "d", Synth2DConfig(**{**cfg.__dict__, "seed": 6}))
    assert (tmp_path / "a/fracture/fracture_0002.png").read_bytes() != (tmp_path / "d/fracture/fracture_0002.png").read_bytes()
    assert pd.read_csv(tmp_path / "a" / "labels.csv").equals(first)


def test_fracture_and_dislocation_change_the_spine_not_the_background() -> None:
    """Same draws, no noise: a fracture darkens bone (lucent line, wedge), a dislocation moves bodies."""
    cfg = Synth2DConfig(size=128, noise=0.0)
    kinds = {k: make_radiograph(k, np.random.default_rng(3), cfg) for k in ("normal", "fracture", "dislocation")}
    normal = kinds["normal"]
    assert normal.shape == (128, 128) and normal.dtype == np.float32 and 0 <= normal.min() and normal.max() <= 1
    for kind in ("fracture", "dislocation"):
        changed = np.abs(kinds[kind] - normal) > 0.05
        assert 20 < changed.sum() < 0.3 * normal.size, kind
        background = normal < 0.3
        assert changed[background].mean() < changed[~background].mean() + 0.2
    assert kinds["fracture"].sum() < normal.sum()  # bone removed, none added


# ------------------------------------------------------------------------------------------ index and reading


def test_index_from_class_folders_and_from_csv_agree(image_folder) -> None:
    by_folder = index_images(image_folder)
    by_csv = index_images(image_folder / "labels.csv")
    assert by_folder.classes == by_csv.classes == ["fracture", "normal"]
    assert len(by_folder.frame) == 2 * PER_CLASS
    pd.testing.assert_frame_equal(by_folder.frame, by_csv.frame)
    assert (by_folder.frame["target"] == by_folder.frame["label"].map({"fracture": 0, "normal": 1})).all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in by_folder.frame["path"])


def test_csv_errors_name_the_csv(tmp_path, image_folder) -> None:
    bad_columns = tmp_path / "cols.csv"
    bad_columns.write_text("file,class\na.png,normal\n")
    with pytest.raises(LayoutError, match="missing column") as info:
        index_images(bad_columns)
    assert str(bad_columns) in str(info.value)
    absent = tmp_path / "absent.csv"
    pd.DataFrame({"path": ["nowhere.png", str(next(image_folder.glob("normal/*.png")))],
                  "label": ["fracture", "normal"]}).to_csv(absent, index=False)
    with pytest.raises(LayoutError, match="do not exist"):
        index_images(absent)
    with pytest.raises(LayoutError, match="not found"):
        index_images(tmp_path / "no_such_folder")


def test_unreadable_image_is_named_or_skipped_with_a_warning(tmp_path, caplog) -> None:
    write_image_folder(tmp_path / "data", Synth2DConfig(per_class=3, seed=0, size=32))
    broken = tmp_path / "data" / "normal" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    index = index_images(tmp_path / "data")
    assert str(broken) in index.frame["path"].tolist()
    with pytest.raises(CSpineError) as info:
        check_images(index, 1, 32, None)
    assert str(broken) in str(info.value)
    with caplog.at_level(logging.WARNING):
        kept, images = check_images(index, 1, 32, None, skip_unreadable=True, keep=True)
    assert str(broken) in caplog.text
    assert [p for p, _ in kept.skipped] == [str(broken)]
    assert len(kept.frame) == 6 and len(images) == 6 and str(broken) not in kept.frame["path"].tolist()


def test_png_and_dicom_read_back_the_written_pixels(tmp_path) -> None:
    image = make_radiograph("fracture", np.random.default_rng(1), Synth2DConfig(size=64))
    write_dicom(tmp_path / "x.dcm", image)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp_path / "x.png")
    # The generator stores image × 1900 − 400 HU; the (−400, 1500) window maps it back exactly (to rounding).
    from_dicom = read_image(tmp_path / "x.dcm", 1, 64, (-400.0, 1500.0))
    np.testing.assert_allclose(from_dicom[0], image, atol=1.0 / 1900 + 1e-6)
    from_png = read_image(tmp_path / "x.png", 3, 64)
    assert from_png.shape == (3, 64, 64)
    np.testing.assert_allclose(from_png[1], np.round(image * 255) / 255, atol=1e-6)
    np.testing.assert_array_equal(from_png[0], from_png[2])
    smaller = read_image(tmp_path / "x.png", 1, 32)
    assert smaller.shape == (1, 32, 32)
    assert abs(float(smaller.mean()) - float(image.mean())) < 0.01  # antialiased resize keeps the mean


# ------------------------------------------------------------------------------------------ split and metrics


def test_splits_are_stratified_disjoint_and_seeded() -> None:
    targets = np.repeat([0, 1, 2], [60, 30, 30])
    holdout = split_indices(targets, TwoDSplitConfig(mode="holdout", val_fraction=0.2, test_fraction=0.2), seed=1)
    assert sum(len(v) for v in holdout.values()) == 120
    assert len(np.intersect1d(holdout["train"], holdout["val"])) == len(np.intersect1d(holdout["val"], holdout["test"])) == 0
    for name in ("val", "test"):
        assert len(holdout[name]) == 24
        assert np.bincount(targets[holdout[name]]).tolist() == [12, 6, 6]
    again = split_indices(targets, TwoDSplitConfig(mode="holdout", val_fraction=0.2, test_fraction=0.2), seed=1)
    assert all(np.array_equal(holdout[k], again[k]) for k in holdout)

    kfold = TwoDSplitConfig(mode="kfold", test_fraction=0.2)
    folds = [split_indices(targets, kfold, fold=k, n_folds=4, seed=1) for k in range(4)]
    assert all(np.array_equal(f["test"], folds[0]["test"]) for f in folds)  # one test split for every fold
    vals = np.concatenate([f["val"] for f in folds])
    assert len(vals) == len(np.unique(vals)) == 96 and len(np.intersect1d(vals, folds[0]["test"])) == 0
    assert all(np.bincount(targets[f["val"]]).tolist() == [12, 6, 6] for f in folds)
    with pytest.raises(ConfigError, match="class counts"):
        split_indices(np.array([0, 0, 0, 0, 1]), TwoDSplitConfig(mode="kfold", test_fraction=0.0), n_folds=3)


def test_binary_metrics_by_hand_and_the_positive_class_rule() -> None:
    classes = ["fracture", "normal"]
    assert positive_index(classes) == 0 and positive_index(["a", "b"]) == 1 and positive_index(classes, "normal") == 1
    with pytest.raises(ConfigError):
        positive_index(classes, "dislocation")
    # truth: 3 fractures, 3 normals; predicted fracture for 2 fractures and 1 normal.
    y = np.array([0, 0, 0, 1, 1, 1])
    p_fracture = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1])
    m = classification_metrics(y, np.column_stack([p_fracture, 1 - p_fracture]), classes)
    assert list(m) == list(METRIC_COLUMNS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(8 / 9)  # 8 of the 9 (fracture, normal) pairs are ranked right
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.3, 0.4, 0.8, 0.9]))
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_multiclass_metrics_are_macro_one_vs_rest(tmp_path) -> None:
    classes = ["dislocation", "fracture", "normal"]
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.5, .4, .1], [.1, .7, .2], [.6, .3, .1], [.1, .1, .8], [.2, .2, .6]])
    m = classification_metrics(y, probs, classes)
    # predicted: 0, 0, 1, 0, 2, 2 → per class precision (2/3, 1, 1), recall (1, 1/2, 1), specificity (3/4, 1, 1)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert m["recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["specificity"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert m["f1"] == pytest.approx((0.8 + 2 / 3 + 1) / 3)
    # one-vs-rest AUCs: dislocation 7/8 (fracture image 3 at 0.6 outranks 0.5), fracture 7/8
    # (0.4 of image 1 outranks 0.3), normal 1.
    assert m["roc_auc"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)
    frame = pd.DataFrame({"path": [f"img{i}.png" for i in range(6)], "label": [classes[t] for t in y], "target": y})
    result = write_split_report(tmp_path, "test", frame, probs, classes)
    matrix = pd.read_csv(tmp_path / "test_confusion_matrix.csv", index_col=0)
    assert matrix.to_numpy().tolist() == [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    assert result["metrics"]["accuracy"] == pytest.approx(5 / 6)
    assert (tmp_path / "test_roc.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ training


def test_training_learns_and_beats_the_prior(trained_run) -> None:
    summary = pd.read_csv(trained_run / "summary.csv")
    assert summary["epoch"].tolist() == list(range(1, 19))
    assert summary["train_loss"].tail(3).mean() < 0.75 * summary["train_loss"].head(3).mean()
    for column in ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_specificity", "val_f1",
                   "val_roc_auc", "lr", "time_s"):
        assert column in summary.columns
    test = pd.read_csv(trained_run / "report" / "test_metrics.csv")
    predictions = pd.read_csv(trained_run / "report" / "test_predictions.csv")
    prior_accuracy = predictions["label"].value_counts(normalize=True).max()  # always guessing the majority
    assert test.loc[0, "accuracy"] > prior_accuracy + 0.2, test
    assert test.loc[0, "roc_auc"] > 0.85, test
    best = load_checkpoint(trained_run / "best.pt")
    assert best["extra"]["classes"] == ["fracture", "normal"] and best["extra"]["positive_class"] == "fracture"
    assert best["best_score"] == pytest.approx(summary["val_loss"].min(), rel=1e-5)


def test_reports_have_the_expected_columns_and_agree_with_the_predictions(trained_run) -> None:
    report = trained_run / "report"
    splits = pd.read_csv(trained_run / "splits.csv")
    for split in ("val", "test"):
        metrics = pd.read_csv(report / f"{split}_metrics.csv")
        assert list(metrics.columns) == list(METRIC_COLUMNS)
        per_class = pd.read_csv(report / f"{split}_per_class.csv")
        assert list(per_class.columns) == ["class", "precision", "recall", "specificity", "f1", "roc_auc", "support",
                                           "tp", "fp", "fn", "tn"]
        predictions = pd.read_csv(report / f"{split}_predictions.csv")
        assert list(predictions.columns) == ["path", "label", "predicted", "prob_fracture", "prob_normal"]
        assert sorted(predictions["path"]) == sorted(splits.loc[splits["split"] == split, "path"])
        np.testing.assert_allclose(predictions[["prob_fracture", "prob_normal"]].sum(1), 1.0, rtol=1e-6)
        # Recount accuracy, sensitivity and specificity of "fracture" from the per-image predictions.
        truth, guess = predictions["label"] == "fracture", predictions["predicted"] == "fracture"
        assert metrics.loc[0, "accuracy"] == pytest.approx((truth == guess).mean())
        assert metrics.loc[0, "sensitivity"] == pytest.approx((truth & guess).sum() / truth.sum())
        assert metrics.loc[0, "specificity"] == pytest.approx((~truth & ~guess).sum() / (~truth).sum())
        matrix = pd.read_csv(report / f"{split}_confusion_matrix.csv", index_col=0)
        assert matrix.to_numpy().sum() == len(predictions) == metrics.loc[0, "n"]
        text = (report / f"{split}_classification_report.txt").read_text()
        assert "fracture" in text and "normal" in text and "macro avg" in text
        for picture in ("confusion.png", "roc.png"):
            assert (report / f"{split}_{picture}").stat().st_size > 1000
    assert (trained_run / "curves.png").is_file() and "## test split" in (report / "report.md").read_text()
    # The DICOM images were indexed and used like the PNGs.
    assert splits["path"].str.endswith(".dcm").sum() == 2 * N_DICOM


def test_resume_equals_uninterrupted(tmp_path, image_folder, monkeypatch) -> None:
    table = pd.read_csv(image_folder / "labels.csv").groupby("label").head(20)
    table["path"] = [str(image_folder / p) for p in table["path"]]
    table.to_csv(tmp_path / "subset.csv", index=False)
    straight = train_2d(_tiny_config(tmp_path / "straight", tmp_path / "subset.csv", epochs=3))

    cfg = _tiny_config(tmp_path / "resumed", tmp_path / "subset.csv", epochs=3)
    original = loop_module.train_one_epoch

    def interrupted(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop_module, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_2d(cfg)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    with pytest.raises(ConfigError, match="resume"):
        train_2d(cfg)  # refuses to overwrite a run
    resumed = train_2d(cfg, resume=True)

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    summary_a, summary_b = pd.read_csv(straight / "summary.csv"), pd.read_csv(resumed / "summary.csv")
    assert summary_b["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(summary_a["train_loss"], summary_b["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(summary_a["val_loss"], summary_b["val_loss"], rtol=1e-6)


def test_time_budget_stops_after_the_first_epoch(tmp_path, image_folder) -> None:
    cfg = _tiny_config(tmp_path / "budget", image_folder / "labels.csv", epochs=5, max_minutes=1e-4)
    run = train_2d(cfg)
    assert pd.read_csv(run / "summary.csv")["epoch"].tolist() == [1]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert (run / "report" / "test_metrics.csv").is_file()  # the reports still come from best.pt


def test_validation_starts_at_val_from_of_the_run_and_best_pt_comes_from_a_validated_epoch(tmp_path, image_folder) -> None:
    cfg = _tiny_config(tmp_path / "late", image_folder / "labels.csv", epochs=4, val_every=1, val_from=0.5, patience=0)
    run = train_2d(cfg)
    summary = pd.read_csv(run / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2, 3, 4]
    assert summary.loc[summary["val_loss"].notna(), "epoch"].tolist() == [2, 3, 4]  # 0.5 of 4 planned epochs
    assert load_checkpoint(run / "best.pt")["epoch"] in (2, 3, 4)
    with pytest.raises(ConfigError, match="val_from"):
        load_config(TwoDConfig, None, ["train.val_from=1.0"]).validate()


def test_config_refuses_bad_values() -> None:
    for key, value in (("split.mode", "random"), ("data.in_chans", 2), ("train.monitor", "train_loss"),
                       ("split.val_fraction", 0.9), ("fold", 7)):
        cfg = load_config(TwoDConfig, None, [f"{key}={value}", "split.mode=kfold" if key == "fold" else "fold=0"])
        with pytest.raises(ConfigError):
            cfg.validate()
    with pytest.raises(ConfigError, match="'aug.paste_prob' is no longer a setting"):  # stage 2's copy-paste
        load_config(TwoDConfig, None, ["aug.paste_prob=0.5"])
    assert load_config(TwoDConfig, None, ["train.monitor=val_roc_auc"]).monitor_mode == "max"
    assert load_config(TwoDConfig, REPO_ROOT / "configs" / "twod_convnext_tiny.yaml").model.backbone == "convnext_tiny"


def test_local_pretrained_file_loads_the_body_and_resizes_stem_and_head(tmp_path) -> None:
    import timm

    from rsna_cspine.twod.model import ImageClassifier

    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=1000)  # an "ImageNet" checkpoint, 3 channels
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = ImageClassifier("test_resnet", 1, 2, pretrained_file=str(tmp_path / "weights.pth"))
    weights = model.backbone.state_dict()
    assert torch.equal(weights["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
    assert weights["conv1.0.weight"].shape[1] == 1 and model.backbone.get_classifier().out_features == 2
    # The backbone's pretrained_cfg statistics (test_resnet: 0.5 / 0.5) replace the scratch centring (0.25).
    assert model.input_norm.std.flatten().tolist() == [0.5]
    assert ImageClassifier("test_resnet", 1, 2).input_norm.std.flatten().tolist() == [0.25]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model.backbone((x - 0.5) / 0.5))
    with pytest.raises(ConfigError, match="not found"):
        ImageClassifier("test_resnet", 1, 2, pretrained_file=str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------------------ predict and Grad-CAM


def test_predict_2d_prints_probabilities_that_sum_to_one(trained_run, tmp_path, capsys) -> None:
    predictions = pd.read_csv(trained_run / "report" / "test_predictions.csv")
    row = predictions.iloc[0]
    cam = tmp_path / "cam.png"
    capsys.readouterr()
    assert cli_main(["predict-2d", row["path"], "--checkpoint", str(trained_run / "best.pt"), "--cam", str(cam),
                     "--device", "cpu"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    probs = {name: float(value) for name, value in lines}
    assert list(probs) == ["fracture", "normal"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    # The single-image path gives what the batched test-split prediction gave for the same file.
    assert probs["fracture"] == pytest.approx(row["prob_fracture"], abs=1e-5)
    assert cam.stat().st_size > 1000


def test_gradcam_map_has_the_image_shape_and_leaves_the_model_untouched(trained_run, image_folder) -> None:
    predictor = load_image_classifier(trained_run / "best.pt", "cpu")
    before = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    image = predictor.load(next((image_folder / "fracture").glob("*.png")))
    result = image_gradcam(predictor.model, image)
    assert result.cam.shape == (SIZE, SIZE) and result.cam.dtype == np.float32
    # The definition, computed here independently: hook the last stage, weight its channels by their mean
    # gradient of the explained logit, ReLU, upsample. An all-zero or unscaled map fails.
    model = copy.deepcopy(predictor.model).eval()
    stage = model.backbone.get_submodule(last_stage_name(model.backbone))
    kept: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    handle = stage.register_forward_hook(keep)
    try:
        model(torch.as_tensor(np.asarray(image, dtype=np.float32))[None])[0, result.class_index].backward()
    finally:
        handle.remove()
    activation = kept[0]
    raw = F.relu((activation.grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True))
    expected = F.interpolate(raw, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].detach().numpy()
    assert result.peak > 0 and result.peak == pytest.approx(float(expected.max()), rel=1e-4)
    assert float(result.cam.max()) == pytest.approx(1.0, rel=1e-6) and float(result.cam.min()) >= 0.0
    np.testing.assert_allclose(result.cam * result.peak, expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
    assert result.probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.class_index == int(np.argmax(list(predictor.probabilities(image).values())))
    other = image_gradcam(predictor.model, image, class_index=1 - result.class_index)
    assert other.class_index == 1 - result.class_index and np.isfinite(other.cam).all()
    for key, value in predictor.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks or m._backward_hooks for m in predictor.model.modules())
