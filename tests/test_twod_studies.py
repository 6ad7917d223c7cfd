"""2D mode, study level and graded labels: middle-k and mean/max aggregation against a hand computation,
present/absent views, splits that keep a study together, studies from CSV columns and sub-folders, ordinal
(CORAL) outputs, and the column-mask step on a hand-made mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from rsna_cspine.config import load_config
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.twod.config import TwoDConfig, TwoDDataConfig, TwoDSplitConfig
from rsna_cspine.twod.data import index_images
from rsna_cspine.twod.masking import apply_column_mask
from rsna_cspine.twod.model import ImageClassifier, ordinal_probs
from rsna_cspine.twod.report import negative_index
from rsna_cspine.twod.split import split_indices
from rsna_cspine.twod.studies import aggregate_studies, binary_view, middle_rows, prediction_views
from rsna_cspine.twod.task import monitor_view, ordinal_targets

GRADES = ["absent", "mild", "moderate", "severe"]


def _frame() -> tuple[pd.DataFrame, np.ndarray]:
    """Two studies: A with 5 slices (given out of order), B with 2; four graded classes."""
    frame = pd.DataFrame({
        "path": [f"a{i}.png" for i in (3, 0, 4, 1, 2)] + ["b0.png", "b1.png"],
        "study": ["A"] * 5 + ["B"] * 2,
        "slice": [3, 0, 4, 1, 2, 0, 1],
        "label": ["moderate"] * 5 + ["absent"] * 2,
        "target": [2] * 5 + [0] * 2,
    })
    probs = np.array([
        [0.10, 0.20, 0.60, 0.10],  # A slice 3
        [0.90, 0.05, 0.05, 0.00],  # A slice 0
        [0.80, 0.10, 0.10, 0.00],  # A slice 4
        [0.30, 0.30, 0.30, 0.10],  # A slice 1
        [0.20, 0.10, 0.30, 0.40],  # A slice 2
        [0.70, 0.10, 0.10, 0.10],  # B slice 0
        [0.40, 0.30, 0.20, 0.10],  # B slice 1
    ])
    return frame, probs


def test_middle_k_mean_and_max_match_a_hand_computation() -> None:
    frame, probs = _frame()
    # A's slices 1, 2, 3 are its middle three (rows 3, 4, 0); B has fewer than three and keeps both.
    assert middle_rows(frame, 3).tolist() == [0, 3, 4, 5, 6]
    assert middle_rows(frame, 0).tolist() == list(range(7))
    assert middle_rows(frame, 2).tolist() == [3, 4, 5, 6]  # n - k odd: the lower middle (slices 1, 2)

    studies, mean = aggregate_studies(frame, probs, GRADES, "mean", middle_k=3, negative=0)
    assert studies["study"].tolist() == ["A", "B"] and studies["images"].tolist() == [3, 2]
    assert studies["target"].tolist() == [2, 0] and studies["label"].tolist() == ["moderate", "absent"]
    hand_a = (probs[3] + probs[4] + probs[0]) / 3
    hand_b = (probs[5] + probs[6]) / 2
    np.testing.assert_allclose(mean, [hand_a, hand_b])

    # max: the most suspicious image, i.e. the one least likely "absent": A slice 3 (0.10), B slice 1 (0.40).
    _, worst = aggregate_studies(frame, probs, GRADES, "max", middle_k=3, negative=0)
    np.testing.assert_allclose(worst, [probs[0], probs[6]])
    # Without the middle-k restriction A's slice 2 and 3 tie on nothing: slice 3 is still the least "absent".
    _, all_max = aggregate_studies(frame, probs, GRADES, "max", middle_k=0, negative=0)
    np.testing.assert_allclose(all_max[0], probs[0])


def test_binary_max_is_the_largest_positive_probability_and_views_collapse_grades() -> None:
    frame = pd.DataFrame({"path": ["x0", "x1", "y0"], "study": ["X", "X", "Y"], "slice": [0, 1, 0],
                          "label": ["fracture", "fracture", "normal"], "target": [0, 0, 1]})
    probs = np.array([[0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])
    _, study_probs = aggregate_studies(frame, probs, ["fracture", "normal"], "max")
    np.testing.assert_allclose(study_probs[:, 0], [0.8, 0.1])  # max P(fracture) of each study

    graded, graded_probs = _frame()
    data = TwoDDataConfig(study_agg="mean", middle_k=3)
    views = prediction_views(graded, graded_probs, GRADES, data, has_studies=True)
    assert set(views) == {"", "binary_", "study_", "study_binary_"}
    binary = views["binary_"]
    assert binary.classes == ["absent", "present"] and binary.frame["target"].tolist() == [1] * 5 + [0] * 2
    np.testing.assert_allclose(binary.probs[:, 0], graded_probs[:, 0])
    np.testing.assert_allclose(binary.probs.sum(1), 1.0)
    study_binary = views["study_binary_"]
    np.testing.assert_allclose(study_binary.probs[:, 1], 1 - views["study_"].probs[:, 0])
    assert study_binary.id_column == "study" and study_binary.frame["label"].tolist() == ["present", "absent"]
    # A view of a binary problem is not collapsed again; an unknown negative class is refused.
    assert negative_index(["fracture", "normal"]) is None and negative_index(GRADES) == 0
    with pytest.raises(ConfigError, match="negative_class"):
        negative_index(GRADES, "none")
    assert binary_view(views[""], 0).positive_class == "present"


def test_group_split_keeps_every_study_in_one_split() -> None:
    rng = np.random.default_rng(0)
    studies = np.repeat([f"s{i:02d}" for i in range(40)], 5)
    targets = np.repeat(rng.integers(0, 2, 40), 5)
    splits = split_indices(targets, TwoDSplitConfig(val_fraction=0.2, test_fraction=0.2), groups=studies)
    seen = {name: set(studies[rows]) for name, rows in splits.items()}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert sum(len(rows) for rows in splits.values()) == 200
    assert len(seen["test"]) == 8 and len(seen["val"]) == 8  # the fractions count studies
    folds = [split_indices(targets, TwoDSplitConfig(mode="kfold", test_fraction=0.0), fold=k, n_folds=4,
                           groups=studies)["val"] for k in range(4)]
    assert sorted(np.concatenate(folds).tolist()) == list(range(200))
    for rows in folds:
        assert len(set(studies[rows])) * 5 == len(rows)  # whole studies only


def test_studies_come_from_the_csv_or_from_sub_folders(tmp_path: Path) -> None:
    pixel = np.zeros((8, 8), dtype=np.uint8)
    for cls, study, n in (("fracture", "p1", 3), ("normal", "p2", 2)):
        for i in range(n):
            (tmp_path / "tree" / cls / study).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixel).save(tmp_path / "tree" / cls / study / f"img{i}.png")
    Image.fromarray(pixel).save(tmp_path / "tree" / "normal" / "loose.png")
    index = index_images(tmp_path / "tree")
    assert index.has_studies
    assert sorted(index.frame["study"].value_counts().tolist()) == [1, 2, 3]
    assert index.frame.loc[index.frame["study"] == "fracture/p1", "slice"].tolist() == [0, 1, 2]

    rows = [(f"tree/fracture/p1/img{i}.png", "severe", "p1", 2 - i) for i in range(3)]
    rows += [(f"tree/normal/p2/img{i}.png", "absent", "p2", i) for i in range(2)]
    rows += [("tree/normal/loose.png", "mild", "", 0)]
    table = pd.DataFrame(rows, columns=["path", "grade", "study", "slice"])
    table.to_csv(tmp_path / "labels.csv", index=False)
    index = index_images(tmp_path / "labels.csv", label_column="grade", class_order=["absent", "mild", "severe"])
    assert index.classes == ["absent", "mild", "severe"]
    assert index.frame.loc[index.frame["study"] == "p1", "slice"].tolist() == [2.0, 1.0, 0.0]
    assert (index.frame["study"] == index.frame["path"]).sum() == 1  # no study given: the image is its own
    with pytest.raises(LayoutError, match="not in data.class_order"):
        index_images(tmp_path / "labels.csv", label_column="grade", class_order=["absent", "severe"])
    wider = index_images(tmp_path / "labels.csv", label_column="grade", class_order=["absent", "mild", "moderate", "severe"])
    assert wider.classes[2] == "moderate" and (wider.frame["target"] != 2).all()  # an output without images
    with pytest.raises(LayoutError, match="missing column"):
        index_images(tmp_path / "labels.csv", label_column="label")
    table.loc[0, "grade"] = "mild"  # one study, two labels
    table.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(LayoutError, match="several classes"):
        index_images(tmp_path / "mixed.csv", label_column="grade")


def test_ordinal_outputs_are_ordered_probabilities() -> None:
    logits = torch.tensor([[3.0, 0.0, -3.0], [-5.0, -6.0, -7.0], [8.0, 7.0, 6.0]])
    probs = ordinal_probs(logits)
    above = torch.sigmoid(logits)
    torch.testing.assert_close(probs[:, 0], 1 - above[:, 0])
    torch.testing.assert_close(probs[:, 1], above[:, 0] - above[:, 1])
    torch.testing.assert_close(probs[:, 3], above[:, 2])
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert probs[1].argmax() == 0 and probs[2].argmax() == 3
    assert ordinal_targets(torch.tensor([0, 2, 3]), 4).tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]]

    model = ImageClassifier("test_resnet", 1, 4, ordinal=True).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 3)
    # One shared score: the thresholds keep "class > k" non-increasing in k for every image.
    assert (torch.diff(torch.sigmoid(out), dim=1) <= 1e-6).all()
    with pytest.raises(ConfigError, match="three ordered classes"):
        ImageClassifier("test_resnet", 1, 2, ordinal=True)
    with pytest.raises(ConfigError, match="class_order"):
        load_config(TwoDConfig, None, ["model.ordinal=true"]).validate()


def test_monitor_names_map_to_their_views() -> None:
    assert monitor_view("val_loss") == "" and monitor_view("val_roc_auc") == ""
    assert monitor_view("val_study_binary_accuracy") == "study_binary_"
    assert monitor_view("val_binary_f1") == "binary_" and monitor_view("val_study_loss") == "study_"
    with pytest.raises(ConfigError):
        load_config(TwoDConfig, None, ["train.monitor=val_study_auc"]).validate()


def test_column_mask_removes_every_pixel_outside_the_column() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 1.0, size=(3, 32, 32)).astype(np.float32)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 12:18] = True
    overlay = apply_column_mask(image, mask, "overlay", margin=0.0)
    assert (overlay[:, ~mask] == 0).all()
    np.testing.assert_array_equal(overlay[:, mask], image[:, mask])
    widened = apply_column_mask(image, mask, "overlay", margin=2 / 32)
    kept = (widened[0] != 0)
    assert kept[6:26, 10:20].all() and not kept[:5].any() and not kept[:, :9].any()

    crop = apply_column_mask(image, mask, "crop", margin=0.0)
    assert crop.shape == image.shape
    box = torch.from_numpy(image[:, 8:24, 12:18].copy())[None]
    expected = torch.nn.functional.interpolate(box, size=(32, 32), mode="bilinear", align_corners=False,
                                               antialias=True)[0].clamp(0, 1).numpy()
    np.testing.assert_allclose(crop, expected, atol=1e-6)
    # Nothing found: overlay leaves nothing, crop leaves the image.
    assert not apply_column_mask(image, np.zeros_like(mask), "overlay").any()
    np.testing.assert_array_equal(apply_column_mask(image, np.zeros_like(mask), "crop"), image)
