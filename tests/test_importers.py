"""import-labels: public spine data sets → RSNA-layout stage-1 data, and train-seg's ``data.extra``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.paths import REAL_DATA
from rsna_cspine.cli import main
from rsna_cspine.importers import CERVICAL_IDS, find_cases, import_labels
from rsna_cspine.io.kaggle import read_train_labels
from rsna_cspine.io.nifti import load_segmentation
from rsna_cspine.io.study import load_study

TS_REAL = REAL_DATA / "totalsegmentator"
SHAPE = (12, 14, 18)  # stored (i, j, k); k runs inferior → superior below


def _affine(axcodes: str = "PIR", spacing=(1.0, 1.2, 1.5), origin=(20.0, -15.0, 100.0)) -> np.ndarray:
    codes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, code in enumerate(axcodes):
        world, sign = codes[code]
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    return affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def _case(image: Path, labels: Path, values: list[int], seed: int = 0, axcodes: str = "PIR") -> dict[int, np.ndarray]:
    """A CT and a label map on one grid: each of ``values`` fills a slab along the stored third axis.

    Returns each value's voxel centroid in LPS mm (computed from the file's affine alone).
    """
    affine = _affine(axcodes)
    rng = np.random.default_rng(seed)
    _save(image, rng.integers(-1000, 1500, size=SHAPE).astype(np.int16), affine)
    data = np.zeros(SHAPE, dtype=np.int16)
    for n, value in enumerate(values):
        data[3:9, 4:10, 2 * n: 2 * n + 2] = value
    _save(labels, data, affine)
    return {value: _centroid(data, affine, value) for value in values}


def _centroid(data: np.ndarray, affine_ras: np.ndarray, value: int) -> np.ndarray:
    ijk = np.argwhere(data == value).mean(axis=0)
    ras = affine_ras @ np.append(ijk, 1.0)
    return np.array([-ras[0], -ras[1], ras[2]])


def _output_centroids(out: Path, uid: str) -> dict[int, np.ndarray]:
    """Each RSNA label's LPS centroid in an imported segmentation (nibabel and its affine only)."""
    image = nib.load(out / "segmentations" / f"{uid}.nii")
    data = np.asanyarray(image.dataobj)
    return {int(v): _centroid(data, image.affine, int(v)) for v in np.unique(data) if v}


def _assert_moved_to(out: Path, uid: str, source: dict[int, np.ndarray], table: dict[int, int]) -> None:
    got = _output_centroids(out, uid)
    assert sorted(got) == sorted(table[v] for v in source if v in table)
    for value, centroid in source.items():
        if value in table:
            np.testing.assert_allclose(got[table[value]], centroid, atol=1e-4)


def test_verse_and_ctspine1k_cases_keep_c1_to_c7_where_they_were(tmp_path) -> None:
    src = tmp_path / "verse"
    # VerSe'20 layout (rawdata/ + derivatives/): C1, C2, C3, T1, T13 (28); and a lumbar-only case.
    verse = _case(src / "rawdata" / "sub-gl003" / "sub-gl003_ct.nii.gz",
                  src / "derivatives" / "sub-gl003" / "sub-gl003_seg-vert_msk.nii.gz", [1, 2, 3, 8, 28])
    _case(src / "rawdata" / "sub-gl090" / "sub-gl090_ct.nii.gz",
          src / "derivatives" / "sub-gl090" / "sub-gl090_seg-vert_msk.nii.gz", [20, 21], seed=1)
    out = tmp_path / "out"
    report = import_labels("verse", src, out, progress=False).set_index("case")

    assert report.loc["sub-gl003", "status"] == "imported" and report.loc["sub-gl003", "vertebrae"] == "C1 C2 C3"
    assert report.loc["sub-gl090", "status"] == "skipped" and "no cervical" in report.loc["sub-gl090", "reason"]
    _assert_moved_to(out, "verse.sub-gl003", verse, CERVICAL_IDS["verse"])
    # The image and labels read back aligned through the project's own loaders, on the image's grid.
    volume = load_study(out / "train_images" / "verse.sub-gl003.nii.gz")
    labels = load_segmentation(out / "segmentations" / "verse.sub-gl003.nii", volume)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    # train.csv: the imported study, fracture labels unknown (empty), so stage 2 never sees it.
    raw = pd.read_csv(out / "train.csv", dtype={"StudyInstanceUID": str})
    assert raw["StudyInstanceUID"].tolist() == ["verse.sub-gl003"] and raw.drop(columns="StudyInstanceUID").isna().all().all()
    assert read_train_labels(out / "train.csv").empty
    assert read_train_labels(out / "train.csv", keep_unknown=True)["StudyInstanceUID"].tolist() == ["verse.sub-gl003"]

    src = tmp_path / "ctspine"  # labels/<set>/<case>_seg.nii.gz, image volumes/<set>/<case>.nii.gz
    spine = _case(src / "volumes" / "HNSCC" / "HN-01.nii.gz", src / "labels" / "HNSCC" / "HN-01_seg.nii.gz",
                  [5, 6, 7, 8, 20], axcodes="LPS")
    import_labels("ctspine1k", src, out, progress=False)
    _assert_moved_to(out, "ctspine1k.HN-01", spine, CERVICAL_IDS["ctspine1k"])
    # A second import into the same folder adds its rows and keeps the first's.
    assert sorted(read_train_labels(out / "train.csv", keep_unknown=True)["StudyInstanceUID"]) == [
        "ctspine1k.HN-01", "verse.sub-gl003"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_totalsegmentator_label_maps_of_each_version(tmp_path, version) -> None:
    table = CERVICAL_IDS[f"totalsegmentator-{version}"]
    c1, c7 = (41, 35) if version == "v1" else (50, 44)
    assert table[c1] == 1 and table[c7] == 7
    t1, liver = (34, 5) if version == "v1" else (43, 5)
    source = _case(tmp_path / "ts" / "s0001" / "ct.nii.gz", tmp_path / "ts" / "s0001" / "seg.nii.gz", [c1, c7, t1, liver])
    report = import_labels("totalsegmentator", tmp_path / "ts", tmp_path / "out", ts_version=version, progress=False)
    assert report["status"].tolist() == ["imported"] and report["vertebrae"].tolist() == ["C1 C7"]
    _assert_moved_to(tmp_path / "out", "totalsegmentator.s0001", source, table)


def test_totalsegmentator_per_structure_masks_and_a_failing_case(tmp_path) -> None:
    subject = tmp_path / "ts" / "s0002"
    # One multi-label case, then each label split into its own binary mask file, named as the data set names them.
    centroids = _case(subject / "ct.nii.gz", subject / "all.nii.gz", [2, 3, 9])
    everything = np.asanyarray(nib.load(subject / "all.nii.gz").dataobj)
    (subject / "all.nii.gz").unlink()
    for name, value in (("vertebrae_C2", 2), ("vertebrae_C3", 3), ("liver", 9)):
        _save(subject / "segmentations" / f"{name}.nii.gz", (everything == value).astype(np.uint8), _affine())
    broken = tmp_path / "ts" / "s0003"
    (broken / "segmentations").mkdir(parents=True)
    (broken / "ct.nii.gz").write_bytes(b"not a NIfTI file")

    report = import_labels("totalsegmentator", tmp_path / "ts", tmp_path / "out", progress=False).set_index("case")

    assert report.loc["s0002", "status"] == "imported" and report.loc["s0002", "vertebrae"] == "C2 C3"
    _assert_moved_to(tmp_path / "out", "totalsegmentator.s0002", centroids, {2: 2, 3: 3})
    assert report.loc["s0003", "status"] == "failed" and "cannot read NIfTI" in report.loc["s0003", "reason"]
    assert "s0003" in (tmp_path / "out" / "import_failures.csv").read_text()
    # A rerun resumes the finished case and retries the failed one.
    again = import_labels("totalsegmentator", tmp_path / "ts", tmp_path / "out", progress=False)
    assert again["status"].tolist() == report["status"].tolist()


def test_real_totalsegmentator_example_is_read_and_skipped_as_an_abdomen(tmp_path) -> None:
    if not (TS_REAL / "example_seg_dicom.nii.gz").is_file():
        pytest.skip("real TotalSegmentator example not present")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,labels,case\n{TS_REAL / 'example_ct_dicom'},{TS_REAL / 'example_seg_dicom.nii.gz'},example\n")
    [case] = find_cases("totalsegmentator", pairs)
    # Its label map lands on the DICOM series through both affines: the v2 ids of an abdomen (liver 5,
    # T12 = 32, T11 = 33, costal cartilages 117), bone labels on bone.
    volume = load_study(case.image, workers=1)
    labels = load_segmentation(case.labels, volume, max_label=None)
    assert {5, 32, 33, 117} <= set(np.unique(labels).tolist())
    assert np.median(volume.hu[labels == 32]) > 150 and np.median(volume.hu[labels == 5]) < 150

    assert main(["import-labels", "--format", "totalsegmentator", str(pairs), str(tmp_path / "out"), "--no-progress"]) == 0
    report = pd.read_csv(tmp_path / "out" / "import_report.csv")
    assert report["status"].tolist() == ["skipped"]
    assert "no cervical vertebra label" in report["reason"][0] and "32 33" in report["source_labels"][0]
    assert not (tmp_path / "out" / "segmentations").exists()
    assert pd.read_csv(tmp_path / "out" / "train.csv").empty


def test_train_seg_reads_rsna_and_imported_studies_in_one_run(tmp_path) -> None:
    from rsna_cspine.config import load_config
    from rsna_cspine.seg.config import SegConfig
    from rsna_cspine.prepare import PrepareConfig, Stage1InputConfig, prepare_dataset
    from rsna_cspine.seg.train import segmentation_data, split_studies, study_sources
    from rsna_cspine.synth import SynthConfig, write_dataset

    rsna = tmp_path / "rsna"
    write_dataset(rsna, SynthConfig(n_studies=3, seed=3, image_size=32, n_slices=(20, 24), test_fraction=0.0),
                  progress=False)
    src = tmp_path / "verse"
    for k in range(2):
        _case(src / f"sub-{k}_ct.nii.gz", src / f"sub-{k}_seg-vert_msk.nii.gz", [1, 2, 3, 4], seed=k)
    import_labels("verse", src, tmp_path / "imported", progress=False)

    cfg = load_config(SegConfig, None, [f"data.root={rsna}", f"data.extra=[{tmp_path / 'imported'}]",
                                        f"data.cache_dir={tmp_path / 'cache'}", "data.grid=[16,16,16]",
                                        "model.channels=[4,8]", "model.strides=[2]"])
    sources = study_sources(cfg.data)
    assert sorted(u for u in sources if u.startswith("verse.")) == ["verse.sub-0", "verse.sub-1"]
    assert len(sources) == 5
    # Each folder is prepared like the competition data; the imported one into cache/extra0.
    prep = PrepareConfig(stage1=Stage1InputConfig(grid=(16, 16, 16)), segmented_only=True, workers=1, cpus=1)
    for root, cache in ((rsna, tmp_path / "cache"), (tmp_path / "imported", tmp_path / "cache" / "extra0")):
        assert prepare_dataset(root, cache, prep, progress=False).failed == {}
    cached = segmentation_data(cfg)
    assert sorted(cached) == sorted(sources)
    assert all(cached[u].is_relative_to(tmp_path / "cache" / "extra0") for u in ("verse.sub-0", "verse.sub-1"))
    assert not any(cached[u].is_relative_to(tmp_path / "cache" / "extra0") for u in cached if not u.startswith("verse."))
    with np.load(cached["verse.sub-0"]) as npz:
        assert set(np.unique(npz["labels"]).tolist()) == {0, 1, 2, 3, 4} and npz["image"].shape == (1, 16, 16, 16)
    train, val = split_studies(sorted(cached), 0, 2, 0)
    assert sorted(train + val) == sorted(sources)
