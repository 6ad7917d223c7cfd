"""Stage 1's anatomical quality check on phantoms, on phantoms made implausible on purpose, and on real files.

The phantoms' true label maps pass it whole; the same maps with labels swapped, a vertebra moved into
the brain, a vertebra cut by the scan's edge or grown to a lumbar size lose exactly the vertebrae that
no longer fit. On the real partial RSNA series (a few millimetres of skull base or upper thorax) no
labelling at all can pass: whatever a network puts there is cut by the scan's edges.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_cspine.constants import PROB_EPS, VERTEBRAE
from rsna_cspine.seg.masks import mask_table
from rsna_cspine.seg.preprocess import fold_labels
from rsna_cspine.seg.qc import (
    LEVEL_LIMITS,
    QC_COLUMNS,
    check_vertebrae,
    dropped_labels,
    kept_vertebrae,
    qc_summary,
)
from rsna_cspine.synth import SynthConfig
from rsna_cspine.synth.phantom import make_phantom
from tests.paths import REAL_DATA
from tests.toy_pipeline import GOOD, make_tiny_dataset, make_tiny_models
from tests.toy_seg import IntensityBands
from tests.toy_volume import axial_volume

PARTIAL = REAL_DATA / "rsna_partial"


def _phantom(seed: int, fov: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    cfg = SynthConfig(image_size=96, thick_slice_fraction=0.0, wide_fov_fraction=0.0)
    phantom = make_phantom(cfg, np.random.default_rng(seed), fov=fov)
    return fold_labels(phantom.labels), tuple(float(s) for s in phantom.spacing)


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A vertex-to-chest phantom: its brain lies far above C1."""
    return _phantom(11, "head")


@pytest.fixture(scope="module")
def neck() -> tuple[np.ndarray, tuple[float, float, float]]:
    return _phantom(12, "neck")


def _check(labels: np.ndarray, spacing, **kwargs) -> pd.DataFrame:
    return check_vertebrae(mask_table(labels), spacing, labels.shape, **kwargs)


def _move(labels: np.ndarray, label: int, shift: tuple[int, int, int]) -> np.ndarray:
    """The vertebra ``label`` moved by ``shift`` voxels (what a network that put it elsewhere would give)."""
    out = labels.copy()
    where = np.nonzero(labels == label)
    out[where] = 0
    moved = tuple(np.clip(w + s, 0, n - 1) for w, s, n in zip(where, shift, labels.shape))
    out[moved] = label
    return out


@pytest.mark.parametrize("which", ["head", "neck"])
def test_true_phantom_labels_pass_whole(which, request) -> None:
    labels, spacing = request.getfixturevalue(which)
    table = _check(labels, spacing)
    assert table["qc"].tolist() == ["ok"] * 7, qc_summary(table)
    assert set(QC_COLUMNS) <= set(table.columns)
    for name, height, volume in zip(table["vertebra"], table["height_mm"], table["volume_ml"]):
        limits = LEVEL_LIMITS[name]
        assert limits.height_mm[0] <= height <= limits.height_mm[1]
        assert limits.volume_ml[0] <= volume <= limits.volume_ml[1]
    assert qc_summary(table) == "kept C1,C2,C3,C4,C5,C6,C7"


def test_swapped_labels_are_dropped_and_what_is_kept_is_in_its_true_place(neck) -> None:
    labels, spacing = neck
    swapped = labels.copy()
    swapped[labels == 3], swapped[labels == 5] = 5, 3
    table = _check(swapped, spacing)
    kept = kept_vertebrae(table)
    assert "C3" not in kept and "C5" not in kept
    assert kept and all(np.array_equal(swapped == VERTEBRAE.index(v) + 1, labels == VERTEBRAE.index(v) + 1) for v in kept)
    assert sorted(dropped_labels(table)) == [VERTEBRAE.index(v) + 1 for v in VERTEBRAE if v not in kept]
    assert "above" in table.set_index("vertebra").loc["C5", "qc"] or "not on one column" in table.set_index("vertebra").loc["C5", "qc"]


def test_c1_and_c2_in_the_brain_are_dropped_and_c3_to_c7_kept(head) -> None:
    labels, spacing = head
    up = -int(round(80.0 / spacing[0]))  # 80 mm higher: inside the skull
    assert (labels == 1).nonzero()[0].min() + up >= 0
    brain = _move(_move(labels, 1, (up, 0, 0)), 2, (up, 0, 0))
    table = _check(brain, spacing).set_index("vertebra")
    assert kept_vertebrae(table.reset_index()) == ["C3", "C4", "C5", "C6", "C7"]
    assert "below C2" in table.loc["C1", "qc"] or "below C2" in table.loc["C2", "qc"] or "C3" in table.loc["C2", "qc"]


def test_a_vertebra_moved_into_the_tongue_is_dropped(neck) -> None:
    labels, spacing = neck
    forward = -int(round(45.0 / spacing[1]))  # 45 mm anterior (rows run anterior → posterior)
    table = _check(_move(labels, 4, (0, forward, 0)), spacing)
    assert "C4" not in kept_vertebrae(table)
    assert len(kept_vertebrae(table)) >= 3
    # Every kept vertebra is still a run of true neighbours.
    kept = [VERTEBRAE.index(v) for v in kept_vertebrae(table)]
    assert kept == list(range(kept[0], kept[0] + len(kept)))


def test_a_vertebra_cut_by_the_edge_of_the_scan_needs_most_of_its_height_in_view(neck) -> None:
    labels, spacing = neck
    rows = np.nonzero((labels == 7).any(axis=(1, 2)))[0]
    typical = LEVEL_LIMITS["C7"].typical_height_mm
    for shown_mm, kept in ((0.4 * typical, False), (0.95 * typical, True)):
        stop = rows[0] + max(1, int(round(shown_mm / spacing[0])))
        table = _check(labels[:stop], spacing).set_index("vertebra")
        assert (table.loc["C7", "qc"] == "ok") == kept, table.loc["C7", "qc"]
        assert (table.loc[["C1", "C2", "C3", "C4", "C5", "C6"], "qc"] == "ok").all()
    assert "cut by the edge" in _check(labels[: rows[0] + 2], spacing).set_index("vertebra").loc["C7", "qc"]


def test_a_vertebra_of_lumbar_size_is_dropped(neck) -> None:
    labels, spacing = neck
    grown = labels.copy()
    z, y, x = np.nonzero(labels == 6)
    # A block the size of a lumbar body (40 × 30 × 25 mm) where C6 is.
    half = [int(round(h / s)) for h, s in zip((12.5, 15.0, 20.0), spacing)]
    centre = [int(np.mean(a)) for a in (z, y, x)]
    region = tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, half))
    grown[region] = np.where(grown[region] == 0, 6, grown[region])
    table = _check(grown, spacing).set_index("vertebra")
    assert table.loc["C6", "qc"].startswith("dropped: volume")


def test_the_box_the_network_saw_counts_as_an_edge(neck) -> None:
    labels, spacing = neck
    rows = np.nonzero((labels == 1).any(axis=(1, 2)))[0]
    # A fine box whose top face cuts C1 in half, and whose in-plane faces lie inside the volume.
    start = (int(rows[0] + rows[-1]) // 2, 4, 4)
    size = (labels.shape[0] - start[0], labels.shape[1] - 8, labels.shape[2] - 8)
    cropped = np.zeros_like(labels)
    inside = tuple(slice(a, a + n) for a, n in zip(start, size))
    cropped[inside] = labels[inside]
    table = _check(cropped, spacing, box=(start, size)).set_index("vertebra")
    assert "cut by the edge" in table.loc["C1", "qc"]
    assert table.loc["C4", "qc"] == "ok"
    # A vertebra touching an in-plane face of the box was cut by it: the localiser missed.
    y_rows = np.nonzero((labels == 4).any(axis=(0, 2)))[0]
    box = ((0, int(y_rows[0] + y_rows[-1]) // 2, 0), (labels.shape[0], labels.shape[1], labels.shape[2]))
    clipped = labels.copy()
    clipped[:, : box[0][1]] = 0
    table = _check(clipped, spacing, box=box).set_index("vertebra")
    assert "cut by the fine box" in table.loc["C4", "qc"]


def test_predict_removes_dropped_vertebrae_from_the_mask_and_logs_why(head, caplog) -> None:

    from rsna_cspine.seg.config import SegConfig, SegDataConfig, SegPredictConfig
    from rsna_cspine.seg.predict import Segmenter

    labels, spacing = head
    up = -int(round(80.0 / spacing[0]))
    brain = _move(labels, 1, (up, 0, 0))
    # HU whose windowed value is label / 10: the band network answers the label map exactly.
    volume = axial_volume(200.0 * brain - 400.0, study_uid="1.2.3.test")
    volume.spacing = spacing
    cfg = SegConfig(data=SegDataConfig(grid=brain.shape, antialias=False), predict=SegPredictConfig(upsample="nearest"))
    segmenter = Segmenter([IntensityBands()], cfg, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="rsna_cspine.seg.predict"):
        result = segmenter.predict(volume)
    table = result.vertebrae.set_index("vertebra")
    assert table.loc["C1", "found"] and table.loc["C1", "qc"].startswith("dropped")
    assert not (result.mask == 1).any() and not (result.grid_mask == 1).any()
    assert all((result.mask == k).sum() == (brain == k).sum() for k in range(2, 8))
    assert "C1 dropped" in caplog.text and result.qc.startswith("kept C2,C3,C4,C5,C6,C7; C1 dropped")


@pytest.mark.skipif(not PARTIAL.is_dir(), reason="real test files not available")
def test_a_vertebra_on_a_single_slice_cannot_pass_even_with_a_wide_slice_step(tmp_path) -> None:
    """693_UNCI.dcm is one 5-mm CT slice whose header gives a 20-mm slice step: 20 mm "in view" is not a vertebra."""
    from rsna_cspine.io.study import load_study

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "1.dcm").symlink_to((REAL_DATA / "pydicom" / "693_UNCI.dcm").resolve())
    volume = load_study(tmp_path / "one")
    assert volume.shape[0] == 1 and volume.spacing[0] == pytest.approx(20.0)
    bone = volume.hu > 250
    for label in range(1, 8):
        table = check_vertebrae(mask_table(np.where(bone, label, 0).astype(np.uint8)), volume.spacing, volume.shape)
        assert kept_vertebrae(table) == [] and "1 slice only" in table.loc[label - 1, "qc"]


@pytest.mark.skipif(not PARTIAL.is_dir(), reason="real test files not available")
@pytest.mark.parametrize("study", sorted(p.name for p in PARTIAL.glob("1.2.826.*")) if PARTIAL.is_dir() else [])
def test_no_labelling_of_a_real_partial_series_passes(study) -> None:
    """Whatever a network labels in a few millimetres of skull base or thorax, at most one vertebra survives."""
    from rsna_cspine.io.study import load_study

    volume = load_study(PARTIAL / study)
    bone = volume.hu > 250
    # The worst a network could do: every bone voxel one vertebra, or the bone cut into seven by row.
    everything = {label: np.where(bone, label, 0).astype(np.uint8) for label in (1, 2, 7)}
    rows = np.minimum((np.arange(volume.shape[1]) * 7) // volume.shape[1] + 1, 7).astype(np.uint8)
    everything[0] = np.where(bone, rows[None, :, None], 0).astype(np.uint8)
    for name, labels in everything.items():
        table = check_vertebrae(mask_table(labels), volume.spacing, volume.shape)
        assert len(kept_vertebrae(table)) <= 1, (name, qc_summary(table))
        assert table.loc[table["found"], "qc"].str.contains("cut by the edge").any()


def test_the_timing_log_holds_each_studys_qc_and_dropped_vertebrae_take_the_prior(tmp_path) -> None:
    from rsna_cspine.inference import FracturePipeline, PipelineConfig, predict_dataset, timing_log_path

    models = make_tiny_models(tmp_path / "models")
    data = make_tiny_dataset(tmp_path / "data", uids=GOOD[:2], broken=False)
    pipeline = FracturePipeline.from_models_dir(models, PipelineConfig(device="cpu"))
    out = tmp_path / "submission.csv"
    predict_dataset(data, models, out, pipeline=pipeline, progress=False)
    timings = pd.read_csv(timing_log_path(out), dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    for uid in GOOD[:2]:
        prediction = pipeline.predict_study(data / "test_images" / uid)
        assert timings.loc[uid, "qc"] == prediction.qc and prediction.qc.startswith("kept ")
        segmentation = pipeline.segment(pipeline.load(data / "test_images" / uid))
        dropped = [i for i, q in enumerate(segmentation.vertebrae["qc"]) if q.startswith("dropped")]
        assert dropped  # the untrained network's labels do not all pass
        np.testing.assert_allclose(prediction.probs[dropped], np.clip(pipeline.prior[dropped], PROB_EPS, 1 - PROB_EPS))
        assert all(f"{VERTEBRAE[i]} dropped by stage 1's quality check" in " ".join(prediction.warnings) for i in dropped)
