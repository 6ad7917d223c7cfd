"""Tests of the synthetic phantom generator and its Kaggle-layout writer (rsna_cspine.synth)."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from scipy import ndimage

from rsna_cspine.constants import REAL_PREVALENCE, TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.synth import SynthConfig, load_config, make_phantom, sample_fracture_labels, write_dataset
from rsna_cspine.synth.dataset import study_streams
from rsna_cspine.synth.labels import REAL_FRACTURES_PER_POSITIVE
from rsna_cspine.synth.phantom import PADDING_HU
from rsna_cspine.synth.slice_files import SliceFileWriter
from rsna_cspine.synth.writer import (
    CODECS,
    available_codecs,
    plan_storage,
    segmentation_affine,
    write_dicom_series,
    write_segmentation,
)
from tests.paths import REPO_ROOT

UID_PATTERN = re.compile(r"^1\.2\.826\.0\.1\.3680043\.\d+$")
#: Small, fast studies for the on-disk tests (anatomy is in mm, so it only gets coarser).
SMALL = dict(image_size=64, n_slices=(20, 26))
#: Every study a neck window (skull base to T1–T4): tests that need all seven vertebrae in view.
NECK = dict(fov_head_fraction=0.0, fov_slab_fraction=0.0)


def read_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU volume sorted superior→inferior by ImagePositionPatient z, read with plain pydicom."""
    datasets = [pydicom.dcmread(path) for path in folder.glob("*.dcm")]
    datasets.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                   for ds in datasets])
    return hu, datasets


# ----------------------------------------------------------------------------- config


def test_config_coerces_lists_and_rejects_bad_values(tmp_path: Path) -> None:
    cfg = SynthConfig(noise_hu=[5, 6], n_slices=[10, 12])
    assert cfg.noise_hu == (5.0, 6.0) and cfg.n_slices == (10, 12)
    with pytest.raises(ConfigError, match="compressed_fraction"):
        SynthConfig(compressed_fraction=1.5)
    with pytest.raises(ConfigError, match="low > high"):
        SynthConfig(fracture_size_mm=(8.0, 3.0))
    with pytest.raises(ConfigError, match="reversed_fraction"):
        SynthConfig(reversed_fraction=0.7, shuffled_fraction=0.5)
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump({"n_studies": 3, "noise_hu": [1, 2], "not_a_knob": 1}))
    with pytest.raises(ConfigError, match="not_a_knob") as info:
        load_config(path)
    assert str(path) in str(info.value)
    path.write_text(yaml.safe_dump({"synth": {"n_studies": 3, "noise_hu": [1, 2]}}))
    cfg = load_config(path, n_studies=5, seed=None)
    assert (cfg.n_studies, cfg.noise_hu, cfg.seed) == (5, (1.0, 2.0), 0)


def test_shipped_yaml_matches_defaults() -> None:
    path = REPO_ROOT / "configs" / "synth.yaml"
    assert load_config(path) == SynthConfig()


# ----------------------------------------------------------------------------- labels


def test_label_sampler_reproduces_real_statistics() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([[d[v] for v in VERTEBRAE] for d in (sample_fracture_labels(rng) for _ in range(30000))])
    for k, name in enumerate(VERTEBRAE):
        assert abs(draws[:, k].mean() - REAL_PREVALENCE[name]) < 0.008, name
    assert abs(draws.any(axis=1).mean() - REAL_PREVALENCE["patient_overall"]) < 0.012
    counts = draws.sum(axis=1)
    counts = counts[counts > 0]
    real = np.array([REAL_FRACTURES_PER_POSITIVE[c] for c in range(1, 7)], dtype=float)
    observed = np.array([(counts == c).mean() for c in range(1, 7)])
    assert np.abs(observed - real / real.sum()).max() < 0.015

    scaled = np.array([[d[v] for v in VERTEBRAE]
                       for d in (sample_fracture_labels(rng, 1.5) for _ in range(20000))])
    expected = np.array([REAL_PREVALENCE[v] for v in VERTEBRAE]) * 1.5
    assert np.abs(scaled.mean(axis=0) - expected).max() < 0.012
    assert not any(any(sample_fracture_labels(rng, 0.0).values()) for _ in range(200))


def test_phantom_prevalence_matches_config() -> None:
    cfg = SynthConfig(image_size=32, n_slices=(8, 8), prevalence_scale=1.5, **NECK)
    phantoms = [make_phantom(cfg, np.random.default_rng(1000 + i)) for i in range(200)]
    labels = np.array([[p.fractured[v] for v in VERTEBRAE] for p in phantoms])
    for k, name in enumerate(VERTEBRAE):
        p = 1.5 * REAL_PREVALENCE[name]
        assert abs(labels[:, k].mean() - p) <= 4 * np.sqrt(p * (1 - p) / 200) + 0.005, name
    p = 1.5 * REAL_PREVALENCE["patient_overall"]
    overall = np.array([ph.patient_overall for ph in phantoms])
    assert abs(overall.mean() - p) <= 4 * np.sqrt(p * (1 - p) / 200)
    assert np.array_equal(overall, labels.any(axis=1))
    # Defects exactly for the fractured vertebrae (at 8 slices of ~25 mm some vertebrae fall between
    # slices, so visibility is checked on the finer studies below).
    for ph in phantoms:
        assert sorted(ph.fracture_masks) == sorted(v for v in VERTEBRAE if ph.fractured[v])


# ----------------------------------------------------------------------------- anatomy


@pytest.fixture(scope="module")
def phantom_96():
    cfg = SynthConfig(image_size=96, n_slices=(48, 48), circular_fov_fraction=1.0, **NECK)
    return cfg, make_phantom(cfg, np.random.default_rng(3), fractured={"C2": 1, "C6": 1})


def test_labels_cover_bone_in_anatomical_order(phantom_96) -> None:
    _, ph = phantom_96
    assert ph.hu.dtype == np.int16 and ph.labels.dtype == np.uint8 and ph.hu.shape == ph.labels.shape
    present = sorted(int(v) for v in np.unique(ph.labels) if v)
    assert present[:7] == list(range(1, 8)) and present[-1] >= 8  # C1..C7 and at least T1
    assert ph.hu[ph.labels > 0].mean() > 200
    for k in range(1, 8):
        assert np.median(ph.hu[ph.labels == k]) > 150, k
    centroids = [ndimage.center_of_mass(ph.labels == k)[0] for k in present]
    assert all(a < b for a, b in zip(centroids, centroids[1:])), centroids
    # Soft tissue and air are where they belong: muscle-like HU around the spine, air at the corners.
    assert -200 < np.median(ph.hu[(ph.labels == 0) & (ph.hu > -500)]) < 150
    assert ph.circular_fov and ph.hu[:, 0, 0].max() == PADDING_HU


def test_phantom_is_deterministic_for_a_seed(phantom_96) -> None:
    cfg, ph = phantom_96
    again = make_phantom(cfg, np.random.default_rng(3), fractured={"C2": 1, "C6": 1})
    assert np.array_equal(again.hu, ph.hu) and np.array_equal(again.labels, ph.labels)
    assert again.fracture_boxes == ph.fracture_boxes
    other = make_phantom(cfg, np.random.default_rng(4), fractured={"C2": 1, "C6": 1})
    assert other.hu.shape != ph.hu.shape or not np.array_equal(other.hu, ph.hu)


@pytest.mark.parametrize("seed", [11, 12])
def test_fracture_changes_only_its_vertebra(seed: int) -> None:
    cfg = SynthConfig(image_size=96, n_slices=(64, 64), **NECK)
    broken = make_phantom(cfg, np.random.default_rng(seed), fractured={"C5": 1})
    intact = make_phantom(cfg, np.random.default_rng(seed), fractured={})
    assert broken.fractured["C5"] == 1 and intact.patient_overall == 0 and not intact.fracture_masks
    diff = np.abs(broken.hu.astype(np.int32) - intact.hu)
    assert (diff > 100).sum() >= 5  # a real, visible defect
    # Allowed zone: the vertebra in either twin, grown by the largest fragment shift (3 mm) plus the
    # reach of the partial-volume smoothing.
    vertebra = (broken.labels == 5) | (intact.labels == 5)
    steps = int(np.ceil(3.5 / min(broken.spacing))) + 3
    zone = ndimage.binary_dilation(vertebra, ndimage.generate_binary_structure(3, 1), iterations=steps)
    assert diff[~zone].max() == 0
    assert np.array_equal(broken.labels[~zone], intact.labels[~zone])
    # The recorded defect is where the HU changed most.
    mask = broken.fracture_masks["C5"]
    assert mask.any() and mask[zone].sum() == mask.sum()
    assert diff[mask].mean() > diff[zone & ~mask].mean()


def test_fracture_boxes_surround_the_defect(phantom_96) -> None:
    _, ph = phantom_96
    assert ph.fracture_boxes
    for name, mask in ph.fracture_masks.items():
        boxes = [b for b in ph.fracture_boxes if b["vertebra"] == name]
        slices_with_defect = {int(z) for z in np.nonzero(mask.sum(axis=(1, 2)) >= 2)[0]}
        assert {b["z"] for b in boxes} == slices_with_defect
        for b in boxes:
            inside = mask[b["z"], b["y"]: b["y"] + b["height"], b["x"]: b["x"] + b["width"]].sum()
            assert inside == mask[b["z"]].sum()
            assert b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["width"] <= 96 and b["y"] + b["height"] <= 96


# ----------------------------------------------------------------------------- DICOM / NIfTI writing


@pytest.fixture(scope="module")
def small_phantom():
    cfg = SynthConfig(image_size=48, n_slices=(14, 14), circular_fov_fraction=1.0, **NECK)
    return cfg, make_phantom(cfg, np.random.default_rng(5), fractured={"C3": 1})


def _storage(phantom, cfg: SynthConfig, codec: str, signed: bool, numbering: str, mixed: bool = False):
    shuffled = 1.0 if numbering == "shuffled" else 0.0
    reversed_ = 1.0 if numbering == "reversed" else 0.0
    cfg = replace(cfg, compressed_fraction=float(codec != "none"), shuffled_fraction=shuffled,
                  reversed_fraction=reversed_, signed_fraction=float(signed),
                  mixed_rescale_fraction=float(mixed), implicit_vr_fraction=0.0)
    codecs = (codec,) if codec != "none" else ()
    return plan_storage(phantom, np.random.default_rng(0), cfg, codecs)


@pytest.mark.parametrize("codec", ["none", *available_codecs()])
def test_dicom_series_round_trip_is_lossless(tmp_path: Path, small_phantom, codec: str) -> None:
    cfg, ph = small_phantom
    assert ph.hu.min() == PADDING_HU  # the -2048 padding must survive every storage
    for signed, numbering, mixed in ((True, "natural", False), (False, "reversed", False),
                                     (True, "shuffled", True)):
        storage = _storage(ph, cfg, codec, signed, numbering, mixed)
        assert storage.numbering == numbering and storage.mixed_rescale == mixed
        folder = tmp_path / f"{codec}_{numbering}"
        write_dicom_series(ph, folder, "1.2.826.0.1.3680043.99", storage)
        names = sorted(int(p.stem) for p in folder.glob("*.dcm"))
        assert names == list(range(1, ph.hu.shape[0] + 1))
        hu, datasets = read_series(folder)
        assert np.array_equal(hu, ph.hu), (codec, numbering)
        ds = datasets[0]
        expected_syntax = CODECS[codec] if codec != "none" else pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.TransferSyntaxUID == expected_syntax
        assert ds.Modality == "CT" and [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [ph.spacing[1], ph.spacing[2]]
        assert ds.PixelRepresentation == int(signed) and ds.BitsAllocated == 16
        numbers = [int(d.InstanceNumber) for d in datasets]  # in superior→inferior order
        assert numbers == list(storage.file_numbers)
        if numbering == "natural":
            assert numbers == sorted(numbers)
        if numbering == "reversed":
            assert numbers == sorted(numbers, reverse=True)
        steps = np.diff([float(d.ImagePositionPatient[2]) for d in datasets])
        assert np.allclose(steps, -ph.spacing[0])
        if mixed:
            assert len({float(d.RescaleIntercept) for d in datasets}) > 1
    # 12-bit unsigned storage (raw = HU + 1024) of a study without the -2048 padding.
    unpadded = replace(ph, hu=np.maximum(ph.hu, -1024).astype(np.int16))
    storage = replace(_storage(unpadded, cfg, codec, False, "natural"), bits_stored=12)
    assert storage.intercepts[0] == -1024
    write_dicom_series(unpadded, tmp_path / "twelve", "1.2.826.0.1.3680043.97", storage)
    hu, datasets = read_series(tmp_path / "twelve")
    assert np.array_equal(hu, unpadded.hu) and datasets[0].BitsStored == 12
    assert datasets[0].pixel_array.max() < 4096


@pytest.mark.parametrize("codec", ["none", "implicit", *available_codecs()])
def test_slice_files_are_the_bytes_pydicom_save_as_writes(tmp_path: Path, small_phantom, codec: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The series writer encodes the shared header once; every file must still be save_as's, byte for byte."""
    cfg, ph = small_phantom
    storage = _storage(ph, cfg, "none" if codec == "implicit" else codec, True, "shuffled", mixed=True)
    if codec == "implicit":
        storage = replace(storage, transfer_syntax=str(pydicom.uid.ImplicitVRLittleEndian))
    write_dicom_series(ph, tmp_path / "fast", "1.2.826.0.1.3680043.96", storage)
    monkeypatch.setattr(SliceFileWriter, "write", lambda self, ds, path: ds.save_as(path, enforce_file_format=True))
    write_dicom_series(ph, tmp_path / "save_as", "1.2.826.0.1.3680043.96", storage)
    files = sorted((tmp_path / "fast").glob("*.dcm"))
    assert len(files) == ph.hu.shape[0]
    for path in files:
        assert path.read_bytes() == (tmp_path / "save_as" / path.name).read_bytes(), (codec, path.name)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == storage.transfer_syntax


def test_segmentation_aligns_by_recipe_and_by_affine(tmp_path: Path, small_phantom) -> None:
    cfg, ph = small_phantom
    for numbering in ("natural", "reversed", "shuffled"):
        storage = _storage(ph, cfg, "none", True, numbering)
        folder = tmp_path / numbering
        write_dicom_series(ph, folder, "1.2.826.0.1.3680043.98", storage)
        path = write_segmentation(ph, tmp_path / f"{numbering}.nii", storage)
        image = nib.load(path)
        stored = np.asarray(image.dataobj)
        assert stored.shape == (ph.hu.shape[2], ph.hu.shape[1], ph.hu.shape[0])
        assert np.allclose(image.affine, segmentation_affine(ph, storage))
        if numbering != "shuffled":  # the public recipe yields the stack in instance-number order
            by_instance = ph.labels[::-1] if numbering == "reversed" else ph.labels
            assert np.array_equal(stored[:, ::-1, ::-1].transpose(2, 1, 0), by_instance)
        # Independently of storage order: DICOM geometry → LPS → RAS → NIfTI voxel lands on the label.
        _, datasets = read_series(folder)
        z, y, x = np.nonzero(ph.labels >= 0)
        ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
        dy, dx = (float(v) for v in datasets[0].PixelSpacing)
        ras = np.stack([-(ipp[z, 0] + x * dx), -(ipp[z, 1] + y * dy), ipp[z, 2], np.ones(len(z))])
        ijk = np.rint(np.linalg.inv(image.affine) @ ras).astype(int)[:3]
        assert np.array_equal(stored[ijk[0], ijk[1], ijk[2]], ph.labels[z, y, x])


# ----------------------------------------------------------------------------- dataset layout


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(n_studies=6, seed=7, test_fraction=0.34, prevalence_scale=2.0, bbox_fraction=1.0,
                      compressed_fraction=0.5, **SMALL)
    table = write_dataset(out, cfg, progress=False)
    return out, cfg, table


def test_layout_is_complete_and_consistent(dataset) -> None:
    out, cfg, table = dataset
    train = pd.read_csv(out / "train.csv")
    test = pd.read_csv(out / "test.csv")
    test_labels = pd.read_csv(out / "test_labels.csv")
    submission = pd.read_csv(out / "sample_submission.csv")
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    assert list(train.columns) == ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
    assert list(test_labels.columns) == list(train.columns)
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert list(submission.columns) == ["row_id", "fractured"]
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    n_test = round(cfg.n_studies * cfg.test_fraction)
    assert len(test_labels) == n_test and len(train) == cfg.n_studies - n_test
    assert len(test) == 8 * n_test
    assert (test["row_id"] == test["StudyInstanceUID"] + "_" + test["prediction_type"]).all()
    assert set(test["prediction_type"]) == set(TARGET_COLUMNS)
    assert test.groupby("StudyInstanceUID").size().eq(8).all()
    assert list(submission["row_id"]) == list(test["row_id"]) and (submission["fractured"] == 0.5).all()
    for labels in (train, test_labels):
        assert (labels["patient_overall"] == labels[list(VERTEBRAE)].max(axis=1)).all()
    all_uids = list(train["StudyInstanceUID"]) + list(test_labels["StudyInstanceUID"])
    assert len(set(all_uids)) == cfg.n_studies and all(UID_PATTERN.match(uid) for uid in all_uids)
    assert set(test["StudyInstanceUID"]) == set(test_labels["StudyInstanceUID"])
    for split, frame in (("train_images", train), ("test_images", test_labels)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(frame["StudyInstanceUID"])
    for row in table.itertuples():
        folder = out / ("test_images" if row.split == "test" else "train_images") / row.StudyInstanceUID
        files = sorted(int(p.stem) for p in folder.glob("*.dcm"))
        assert files == list(range(1, row.n_slices + 1))
        seg = out / "segmentations" / f"{row.StudyInstanceUID}.nii"
        assert seg.exists() == (row.split == "train")  # segmentation_fraction = 1
        if seg.exists():
            assert nib.load(seg).shape == (row.image_size, row.image_size, row.n_slices)
    assert len(boxes) > 0 and set(boxes["StudyInstanceUID"]) <= set(train["StudyInstanceUID"])
    for row in boxes.itertuples():
        assert (out / "train_images" / row.StudyInstanceUID / f"{row.slice_number}.dcm").exists()
        assert train.set_index("StudyInstanceUID").loc[row.StudyInstanceUID, "patient_overall"] == 1


def test_written_studies_equal_their_phantoms(dataset) -> None:
    out, cfg, table = dataset
    for row in table.itertuples():
        phantom = make_phantom(cfg, study_streams(cfg, row.study_index)[0])
        folder = out / ("test_images" if row.split == "test" else "train_images") / row.StudyInstanceUID
        hu, datasets = read_series(folder)
        assert np.array_equal(hu, phantom.hu)
        assert {d.StudyInstanceUID for d in datasets} == {row.StudyInstanceUID}
        assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)
        labels = [phantom.fractured[v] for v in VERTEBRAE]
        assert [getattr(row, v) for v in VERTEBRAE] == labels
        # every fractured vertebra shows a defect, even on this coarse grid (~3 mm pixels, ~8 mm slices)
        assert all(mask.any() for mask in phantom.fracture_masks.values())
    # A bounding box's slice_number is the file number of a slice whose pixels hold the defect.
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    for uid, study_boxes in boxes.groupby("StudyInstanceUID"):
        row = table.set_index("StudyInstanceUID").loc[uid]
        phantom = make_phantom(cfg, study_streams(cfg, int(row["study_index"]))[0])
        _, datasets = read_series(out / "train_images" / uid)
        z_of_number = {int(d.InstanceNumber): z for z, d in enumerate(datasets)}
        defects = np.any(list(phantom.fracture_masks.values()), axis=0)
        for box in study_boxes.itertuples():
            z = z_of_number[box.slice_number]
            assert defects[z, int(box.y): int(box.y + box.height), int(box.x): int(box.x + box.width)].any()


def test_write_refuses_to_mix_runs(dataset) -> None:
    out, cfg, _ = dataset
    with pytest.raises(LayoutError, match="overwrite"):
        write_dataset(out, cfg, progress=False)


# ----------------------------------------------------------------------------- determinism


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_with_any_workers_and_study_k_independent_of_n(tmp_path: Path) -> None:
    cfg = SynthConfig(n_studies=3, seed=21, image_size=48, n_slices=(12, 14), test_fraction=0.0,
                      compressed_fraction=1.0)
    write_dataset(tmp_path / "a", cfg, progress=False)
    write_dataset(tmp_path / "b", cfg, progress=False, workers=2)  # studies made in two processes: same bytes
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second
    assert any(k.endswith(".dcm") for k in first) and any(k.endswith(".nii") for k in first)
    # One more study: the first three are byte-identical (their own child streams).
    write_dataset(tmp_path / "c", replace(cfg, n_studies=4), progress=False)
    third = _tree(tmp_path / "c")
    shared = [k for k in first if k.startswith(("train_images", "segmentations"))]
    assert shared and all(third[k] == first[k] for k in shared)
    # Another seed: other studies.
    write_dataset(tmp_path / "d", replace(cfg, seed=22), progress=False)
    other = _tree(tmp_path / "d")
    assert other["train.csv"] != first["train.csv"]
    assert not set(k for k in other if k.endswith(".dcm")) & set(k for k in first if k.endswith(".dcm"))


# ----------------------------------------------------------------------------- CLI


def _synth_cli(argv: list[str]) -> int:
    """What ``rsna-cspine synth ...`` runs (cli.main builds the same sub-parser)."""
    from rsna_cspine.cli import COMMANDS
    from rsna_cspine.synth import commands

    assert COMMANDS["synth"][0] == commands.__name__
    parser = argparse.ArgumentParser(prog="rsna-cspine synth")
    commands.add_arguments(parser)
    return commands.run(parser.parse_intermixed_args(argv))


def test_cli_writes_dataset_with_yaml_and_flag_precedence(tmp_path: Path) -> None:
    config = tmp_path / "synth.yaml"
    config.write_text(yaml.safe_dump({"n_studies": 5, "image_size": 48, "noise_hu": [3, 4], "seed": 2}))
    out = tmp_path / "out"
    code = _synth_cli([str(out), "--config", str(config), "--studies", "2", "n_slices=[12,13]", "noise_hu=[1,2]",
                       "fracture_size_mm=[4,6]", "test_fraction=0.5", "scale_spacing_with_size=true", "--no-progress"])
    assert code == 0
    written = yaml.safe_load((out / "synth_config.yaml").read_text())
    assert written["n_studies"] == 2 and written["image_size"] == 48 and written["seed"] == 2
    assert written["noise_hu"] == [1.0, 2.0] and written["n_slices"] == [12, 13]
    assert written["fracture_size_mm"] == [4.0, 6.0] and written["compressed_fraction"] == 0.3
    assert len(pd.read_csv(out / "train.csv")) == 1 and len(pd.read_csv(out / "test.csv")) == 8
    with pytest.raises(ConfigError, match="compressed_fraction"):
        _synth_cli([str(tmp_path / "bad"), "compressed_fraction=2", "--no-progress"])


# ----------------------------------------------------------------------------- project loaders


def test_loader_round_trip(dataset) -> None:
    dicom = pytest.importorskip("rsna_cspine.io.dicom")
    out, cfg, table = dataset
    for row in table.itertuples():
        phantom = make_phantom(cfg, study_streams(cfg, row.study_index)[0])
        folder = out / ("test_images" if row.split == "test" else "train_images") / row.StudyInstanceUID
        volume = dicom.load_series(folder, workers=1)
        assert np.array_equal(volume.hu, phantom.hu), (row.codec, row.numbering)
        assert np.allclose(volume.spacing, phantom.spacing)
        assert volume.reversed_numbering == (row.numbering == "reversed") or row.numbering == "shuffled"


def test_segmentation_loader_round_trip(dataset) -> None:
    dicom = pytest.importorskip("rsna_cspine.io.dicom")
    nifti = pytest.importorskip("rsna_cspine.io.nifti")
    out, cfg, table = dataset
    for row in table[table["split"] == "train"].itertuples():
        phantom = make_phantom(cfg, study_streams(cfg, row.study_index)[0])
        volume = dicom.load_series(out / "train_images" / row.StudyInstanceUID, workers=1)
        labels = nifti.load_segmentation(out / "segmentations" / f"{row.StudyInstanceUID}.nii", volume)
        assert np.array_equal(np.asarray(labels), phantom.labels), row.numbering
