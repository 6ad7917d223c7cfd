"""Sagittal images for the 2D mode: planes cut from a volume (geometry and orientation), the fracture grade
read from a phantom's fracture plan, ``synth-sagittal`` output, and ``import-sagittal`` from a VerSe-style
NIfTI pair and from the real TotalSegmentator example CT."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from rsna_cspine.cli import main as cli_main
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.synth.fractures import Defect, FracturePlan
from rsna_cspine.twod.sagittal import FIT_MARGIN, GRADES, SagittalConfig, sagittal_slices, study_grade
from rsna_cspine.twod.sagittal_import import import_sagittal, parse_labels

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real"
TOTALSEG = REAL / "totalsegmentator"


def _defect(radius: float = 2.0, shift: float | None = None) -> Defect:
    return Defect(kind="break", part="body", centre=np.zeros(3), normal=np.array([0.0, 0.0, 1.0]), radius=radius,
                  half_width=1.0, wedge=0.0, contrast=400.0, floor=40.0,
                  shift_mm=None if shift is None else np.array([0.0, shift, 0.0]))


def test_grade_follows_height_loss_displacement_and_defect_size() -> None:
    assert study_grade({}) == "absent"
    assert study_grade({"C5": FracturePlan(defects=[_defect(2.0)])}) == "mild"
    assert study_grade({"C5": FracturePlan(defects=[_defect(5.0)])}) == "moderate"  # a large defect
    assert study_grade({"C5": FracturePlan(defects=[_defect(2.0, shift=1.2)])}) == "moderate"  # displaced
    assert study_grade({"C5": FracturePlan(defects=[_defect(2.0, shift=2.5)])}) == "severe"  # displaced ≥ 2 mm
    assert study_grade({"C5": FracturePlan(defects=[_defect(2.0)], compression=(0.15, 0.5))}) == "moderate"
    assert study_grade({"C5": FracturePlan(defects=[_defect(2.0)], compression=(0.30, 0.5))}) == "severe"
    # The study takes its worst vertebra.
    assert study_grade({"C2": FracturePlan(defects=[_defect(2.0)]),
                        "C6": FracturePlan(defects=[_defect(2.0, shift=3.0)])}) == "severe"


def test_planes_are_centred_on_the_column_with_head_up_and_anterior_left() -> None:
    # A 60 x 50 x 40 volume at 2 x 1 x 1 mm; the "column" is a bar at x 18..21, y 20..29, z 5..54.
    hu = np.full((60, 50, 40), -1000.0, dtype=np.float32)
    column = np.zeros(hu.shape, dtype=bool)
    column[5:55, 20:30, 18:22] = True
    hu[column] = 700.0
    hu[5:8, 20:30, 18:22] = 1500.0  # a bright cap at the superior end
    hu[8:55, 20:25, 18:22] = 1200.0  # a bright anterior half
    cfg = SagittalConfig(slices=5, spacing_mm=2.0, size=50, field_mm=100.0, window=(-1000.0, 2000.0))
    stack = sagittal_slices(hu, column, (2.0, 1.0, 1.0), cfg)
    assert stack.images.shape == (5, 50, 50) and stack.masks.shape == (5, 50, 50)
    assert stack.offsets_mm.tolist() == [-4.0, -2.0, 0.0, 2.0, 4.0]
    middle = stack.masks[2]
    rows, cols = np.nonzero(middle)
    # 2 mm pixels: 100 mm of column height → 50 rows, 10 mm of depth → 5 columns, centred in the field.
    assert rows.max() - rows.min() + 1 == pytest.approx(50, abs=1) and cols.max() - cols.min() + 1 == pytest.approx(5, abs=1)
    assert abs((rows.min() + rows.max()) / 2 - 24.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 24.5) <= 1
    assert stack.images[2][rows.min(), cols.mean().round().astype(int)] > 1400  # the cap is at the top
    assert stack.images[2][rows.mean().round().astype(int), cols.min() + 1] > 1100  # anterior is on the left
    assert stack.images[2][rows.mean().round().astype(int), cols.max() - 1] < 800
    assert not stack.masks[0].any() and not stack.masks[4].any()  # 4 mm off the middle: outside the 4 mm bar
    near = ndimage.binary_dilation(middle, np.ones((3, 3), dtype=bool))
    assert (stack.images[2][~near] == -1000.0).all() or (stack.images[2][~near] <= -1000.0).all()
    with pytest.raises(LayoutError, match="no vertebra"):
        sagittal_slices(hu, np.zeros_like(column), (2.0, 1.0, 1.0), cfg)


def test_a_fitted_field_holds_the_column_height_plus_the_margin_and_integer_maps_keep_their_labels() -> None:
    hu = np.full((60, 50, 40), -1000.0, dtype=np.float32)
    column = np.zeros(hu.shape, dtype=bool)
    column[5:55, 20:30, 18:22] = True  # 50 slices of 2 mm: 100 mm of column
    hu[column] = 700.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[10:20, 22:26, 19:21] = 3
    labels[40:44, 22:26, 19:21] = 5
    cfg = SagittalConfig(slices=3, spacing_mm=1.0, size=55, field_mm=None)
    stack = sagittal_slices(hu, column, (2.0, 1.0, 1.0), cfg, extra=labels)
    assert stack.field_mm == pytest.approx(100.0 * (1 + FIT_MARGIN))  # 110 mm over 55 px: 2 mm per pixel
    assert stack.pixel_mm2 == pytest.approx(4.0)
    rows, _ = np.nonzero(stack.masks[1])
    assert rows.max() - rows.min() + 1 == pytest.approx(50, abs=1)  # 100 mm of column in 2-mm pixels
    assert stack.extra.dtype == np.uint8 and set(np.unique(stack.extra[1])) == {0, 3, 5}
    # 10 slices (20 mm) of label 3 by 4 mm of depth → about 10 x 2 pixels of 2 mm in the plane through it.
    assert (stack.extra[1] == 3).sum() == pytest.approx(20, abs=3)


@pytest.fixture(scope="module")
def sagittal_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sagittal") / "data"
    assert cli_main(["synth-sagittal", str(out), "--studies", "3", "--seed", "7", "--slices", "5", "--size", "48",
                     "synth.image_size=96", "synth.prevalence_scale=2.1"]) == 0
    return out


def test_synth_sagittal_writes_images_masks_and_grades(sagittal_dir: Path, tmp_path: Path) -> None:
    table = pd.read_csv(sagittal_dir / "labels.csv")
    studies = pd.read_csv(sagittal_dir / "studies.csv")
    assert len(table) == 15 and table["study"].nunique() == 3 and table.groupby("study").size().eq(5).all()
    assert set(table["label"]) <= set(GRADES) and table["slice"].tolist() == [0, 1, 2, 3, 4] * 3
    merged = table.merge(studies[["study", "label", "fracture"]], on="study", suffixes=("", "_study"))
    assert (merged["label"] == merged["label_study"]).all()
    assert ((merged["label"] == "absent") == (merged["fracture"] == "normal")).all()
    fractured = studies[studies["label"] != "absent"]
    assert len(fractured) >= 1 and (fractured["vertebrae"].str.len() > 0).all()
    # Defect pixels are counted where a plane crosses a defect (an off-centre one may be crossed by none);
    # an absent study's planes show no defect of a visible fracture, and a plane's own label says what it shows.
    assert (table.loc[table["label"] == "absent", "defect_mm2"] == 0).all() and (table["defect_pixels"] >= 0).all()
    assert ((table["image_label"] == "absent") | (table["image_label"] == table["label"])).all()
    assert (table.loc[table["image_label"] != "absent", "defect_mm2"] >= 8.0).all()
    for row in table.itertuples():
        image = np.asarray(Image.open(sagittal_dir / row.path))
        mask = np.asarray(Image.open(sagittal_dir / row.mask))
        assert image.shape == mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
        if row.slice == 2:  # the middle plane crosses the vertebral bodies: bone is brighter than the rest
            assert (mask > 0).sum() > 50 and image[mask > 0].mean() > image[mask == 0].mean() + 30
    # Study k depends only on (config, seed, k): a one-study run repeats study_0000 exactly.
    again = tmp_path / "again"
    assert cli_main(["synth-sagittal", str(again), "--studies", "1", "--seed", "7", "--slices", "5", "--size", "48",
                     "synth.image_size=96", "synth.prevalence_scale=2.1"]) == 0
    for name in ("study_0000_s00.png", "study_0000_s02.png"):
        first = np.asarray(Image.open(sagittal_dir / "images" / "study_0000" / name))
        np.testing.assert_array_equal(first, np.asarray(Image.open(again / "images" / "study_0000" / name)))
    with pytest.raises(ConfigError, match="fov_slab_fraction"):
        cli_main(["synth-sagittal", str(tmp_path / "x"), "--studies", "1", "synth.fov_slab_fraction=0.1"])


def test_a_present_study_shows_its_fracture_in_its_planes(sagittal_dir: Path, tmp_path: Path) -> None:
    # label_from: slab (the default): every study graded present shows at least min_defect_mm2 (8) of defect
    # in one of its planes, from its visible vertebrae only.
    table = pd.read_csv(sagittal_dir / "labels.csv")
    studies = pd.read_csv(sagittal_dir / "studies.csv").set_index("study")
    present = studies.index[studies["label"] != "absent"]
    assert len(present) >= 1
    shown = table.groupby("study")["defect_mm2"].max()
    assert (shown[present] >= 8.0).all()
    assert (studies.loc[present, "visible_vertebrae"].str.len() > 0).all()
    assert set(studies["field_mm"].round(1)) and (studies["field_mm"] > 60).all()  # fitted to each neck
    # A threshold no defect reaches: the slab rule grades every study absent (its planes show nothing that
    # counts), while the phantom rule keeps the phantoms' grades; the images are the same either way.
    args = ["--studies", "3", "--seed", "7", "--slices", "5", "--size", "48", "synth.image_size=96",
            "synth.prevalence_scale=2.1", "min_defect_mm2=1e9"]
    assert cli_main(["synth-sagittal", str(tmp_path / "slab"), *args]) == 0
    assert cli_main(["synth-sagittal", str(tmp_path / "phantom"), *args, "label_from=phantom"]) == 0
    slab = pd.read_csv(tmp_path / "slab" / "studies.csv").set_index("study")
    phantom = pd.read_csv(tmp_path / "phantom" / "studies.csv").set_index("study")
    assert (slab["label"] == "absent").all() and (slab["phantom_label"] == studies["phantom_label"]).all()
    assert (phantom["label"] == studies["phantom_label"]).all() and (phantom["label"] != "absent").any()
    assert (pd.read_csv(tmp_path / "slab" / "labels.csv")["image_label"] == "absent").all()
    first = np.asarray(Image.open(tmp_path / "slab" / "images" / "study_0000" / "study_0000_s02.png"))
    np.testing.assert_array_equal(first, np.asarray(Image.open(sagittal_dir / "images" / "study_0000" / "study_0000_s02.png")))
    with pytest.raises(ConfigError, match="label_from"):
        cli_main(["synth-sagittal", str(tmp_path / "x"), "--studies", "1", "label_from=vertebra"])


def test_import_from_a_verse_style_nifti_pair(tmp_path: Path) -> None:
    # Stored RAS-first like many VerSe files: axis 0 → right, 1 → anterior, 2 → superior, 1 mm voxels.
    shape = (40, 50, 60)
    ct = np.full(shape, -900.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[18:22, 20:30, 5:55] = 3
    ct[labels > 0] = 600.0
    ct[18:22, 20:30, 50:55] = 1400.0  # superior end (large index along S)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(ct, affine), tmp_path / "case01_ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "case01_msk.nii.gz")
    cfg = SagittalConfig(slices=3, spacing_mm=1.0, size=60, field_mm=60.0, window=(-1000.0, 2000.0))
    added = import_sagittal(tmp_path / "case01_ct.nii.gz", tmp_path / "case01_msk.nii.gz", tmp_path / "out", cfg)
    assert added["study"].unique().tolist() == ["case01_ct"] and len(added) == 3
    image = np.asarray(Image.open(tmp_path / "out" / added["path"][1])).astype(float)
    mask = np.asarray(Image.open(tmp_path / "out" / added["mask"][1])) > 0
    rows, _ = np.nonzero(mask)
    assert rows.max() - rows.min() + 1 == pytest.approx(50, abs=1)
    top = image[rows.min():rows.min() + 3][mask[rows.min():rows.min() + 3]].mean()
    bottom = image[rows.max() - 2:rows.max() + 1][mask[rows.max() - 2:rows.max() + 1]].mean()
    assert top > bottom + 40  # the superior end is at the top of the picture
    with pytest.raises(LayoutError, match="already"):
        import_sagittal(tmp_path / "case01_ct.nii.gz", tmp_path / "case01_msk.nii.gz", tmp_path / "out", cfg)
    assert parse_labels("26-28,50") == frozenset({26, 27, 28, 50}) and parse_labels(None) is None
    with pytest.raises(ConfigError):
        parse_labels("C1-C7")


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason="real TotalSegmentator example not present")
def test_import_from_the_real_totalsegmentator_example(tmp_path: Path) -> None:
    # A real abdominal CT (20 slices, JPEG 2000) and its TotalSegmentator labels: 32 = T12, 33 = T11 in view.
    out = tmp_path / "real"
    assert cli_main(["import-sagittal", str(TOTALSEG / "example_ct_dicom"), str(TOTALSEG / "example_seg_dicom.nii.gz"),
                     str(out), "--labels", "26-50", "--study", "ts_example", "--slices", "3", "--size", "64",
                     "--field-mm", "120"]) == 0
    table = pd.read_csv(out / "labels.csv")
    assert table["study"].tolist() == ["ts_example"] * 3
    middle = table.iloc[1]
    image = np.asarray(Image.open(out / middle["path"])).astype(float)
    mask = np.asarray(Image.open(out / middle["mask"])) > 0
    assert mask.sum() > 20  # the vertebral bodies of T11/T12 cross the mid-sagittal plane
    assert image[mask].mean() > image[~mask & (image > 0)].mean() + 20  # and they are bone, brighter than the rest
