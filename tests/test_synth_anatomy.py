"""The phantom's head, neck and shoulders: anatomy at the right vertebral levels, HU per tissue, the
field-of-view knob, determinism and what a window that misses a vertebra does to its label."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.errors import ConfigError
from rsna_cspine.synth import SynthConfig, make_phantom, write_dataset
from rsna_cspine.synth.fov import draw_fov_kind, plan_window
from rsna_cspine.synth.overview import axial_levels, overview_figure
from rsna_cspine.synth.skeleton import HEAD_HEIGHT_MM, plan_skeleton
from rsna_cspine.synth.tissues import BONE_HU, CONTRAST_HU_RANGES, HU_RANGES, Tissue

#: A wide, clean head-to-chest study: 2 mm voxels, no noise or blur, every optional structure on.
CLEAN = dict(image_size=160, pixel_spacing_mm=(1.25, 1.25), slice_thickness_mm=(2.0, 2.0), thick_slice_fraction=0.0,
             wide_fov_fraction=0.0, noise_hu=(0.0, 0.0), smoothing_voxels=(0.0, 0.0), circular_fov_fraction=0.0,
             thoracic_vertebrae=(3, 3), arms_fraction=1.0, dental_metal_fraction=0.0, contrast_fraction=0.0)


def slices_of(mask: np.ndarray) -> np.ndarray:
    return np.nonzero(mask.any(axis=(1, 2)))[0]


def level(ph, label: int) -> tuple[int, int]:
    """First and last slice holding a vertebra label."""
    z = slices_of(ph.labels == label)
    return int(z[0]), int(z[-1])


@pytest.fixture(scope="module")
def head_phantom():
    cfg = SynthConfig(**CLEAN)
    return cfg, make_phantom(cfg, np.random.default_rng(7), fov="head")


def test_head_window_covers_vertex_to_chest_with_skull_brain_and_shoulders(head_phantom) -> None:
    _, ph = head_phantom
    t = ph.tissue
    assert ph.fov == "head" and ph.scan_top_mm < 25.0
    assert not np.isin(t[0], [Tissue.GREY_MATTER, Tissue.WHITE_MATTER, Tissue.VERTEBRA]).any()  # above the brain
    present = [int(v) for v in np.unique(ph.labels) if v]
    assert present[:10] == list(range(1, 11)) and present[-1] <= 11  # C1..C7, T1..T3 (+ T4's facets)
    for tissue in (Tissue.GREY_MATTER, Tissue.WHITE_MATTER, Tissue.CSF, Tissue.EYE, Tissue.TOOTH, Tissue.LUNG,
                   Tissue.THYROID, Tissue.CARTILAGE, Tissue.FAT, Tissue.MUSCLE, Tissue.BONE, Tissue.ARTERY):
        assert (t == tissue).any(), tissue.name
    c1_top, _ = level(ph, 1)
    brain = (t == Tissue.GREY_MATTER) | (t == Tissue.WHITE_MATTER)
    # The brain ends at the foramen magnum, above C1; the vault reaches ~13 cm higher.
    assert slices_of(brain)[-1] < c1_top
    assert (c1_top - slices_of(brain)[0]) * ph.spacing[0] > 100.0


def test_skull_base_sits_on_c1_and_the_dens_rises_into_its_ring(head_phantom) -> None:
    _, ph = head_phantom
    dz = ph.spacing[0]
    c1_top, c1_bottom = level(ph, 1)
    c2_top, _ = level(ph, 2)
    # Occipital condyles: non-vertebral bone within 10 mm above C1, over its lateral masses.
    c1_columns = (ph.labels[c1_top: c1_top + 2] == 1).any(axis=0)
    above = ph.tissue[max(0, c1_top - int(10 / dz)): c1_top] == Tissue.BONE
    assert (above & c1_columns).any()
    # The dens: C2 reaches up into the slices of C1, inside the ring (between C1's lateral masses).
    assert c2_top <= c1_bottom
    z = (c2_top + c1_bottom) // 2
    c1_cols = np.nonzero((ph.labels[z] == 1).any(axis=0))[0]
    c2_cols = np.nonzero((ph.labels[z] == 2).any(axis=0))[0]
    assert c1_cols.min() < c2_cols.min() and c2_cols.max() < c1_cols.max()


def _rows_of(mask2d: np.ndarray) -> np.ndarray:
    return np.nonzero(mask2d.any(axis=1))[0]


def test_jaws_hyoid_larynx_lie_in_front_of_their_vertebrae(head_phantom) -> None:
    _, ph = head_phantom
    ps = ph.spacing[1]
    t = ph.tissue
    # Teeth between the top of C1 and the bottom of C2 (the occlusal plane crosses C2).
    c1_top, _ = level(ph, 1)
    _, c2_bottom = level(ph, 2)
    teeth = slices_of(t == Tissue.TOOTH)
    assert c1_top - 12 <= teeth.min() and teeth.max() <= c2_bottom + 3
    # Mandible: bone at least 3 cm in front of the C3 body (rows run anterior → posterior).
    c3_top, c3_bottom = level(ph, 3)
    z = (c3_top + c3_bottom) // 2
    body_front = _rows_of(ph.labels[z] == 3).min()
    assert (body_front - _rows_of(t[z] == Tissue.BONE).min()) * ps > 30.0
    # The mandible ends between the C3 and the C4 bodies' centres (neutral neck).
    c4 = level(ph, 4)
    front = np.zeros_like(t[:, :, 0], dtype=bool)
    for k in range(t.shape[0]):
        spine = _rows_of(ph.labels[k] > 0)
        if len(spine):
            front[k, : max(0, spine.min() - int(35 / ps))] = True
    jaw_bone = (t == Tissue.BONE) & front[:, :, None]
    jaw_bone[level(ph, 5)[0]:] = False  # the manubrium and clavicles lie in front of the spine too
    lowest = slices_of(jaw_bone)[-1]
    assert (c3_top + c3_bottom) / 2 - 2 <= lowest <= (c4[0] + c4[1]) / 2 + 4
    # Larynx at C4–C5: thyroid cartilage in front of the airway, the airway in front of the vertebra.
    c5 = level(ph, 5)
    z = (c4[1] + c5[0]) // 2
    cartilage, air, bone = (_rows_of(t[z] == Tissue.CARTILAGE), _rows_of(t[z] == Tissue.AIR),
                            _rows_of(ph.labels[z] > 0))
    spine_col = int(np.nonzero((ph.labels[z] > 0).any(axis=0))[0].mean())
    inside = ndimage.binary_fill_holes(t[z] != Tissue.AIR)
    airway = _rows_of(((t[z] == Tissue.AIR) & inside)[:, spine_col - 3: spine_col + 4])
    assert len(cartilage) and len(air) and len(airway)
    assert cartilage.min() < airway.min() and airway.max() < bone.min()
    cart = slices_of(t == Tissue.CARTILAGE)
    c6_bottom = level(ph, 6)[1]
    larynx = cart[cart < c6_bottom]
    assert larynx.min() >= c4[0] - int(6 / ph.spacing[0])


def test_shoulder_girdle_starts_near_c7_t1_and_lungs_at_t1(head_phantom) -> None:
    _, ph = head_phantom
    dz, ps = ph.spacing[0], ph.spacing[1]
    t = ph.tissue
    c5_top = level(ph, 5)[0]
    c7_top, c7_bottom = level(ph, 7)
    t1_top, t1_bottom = level(ph, 8)
    t2_bottom = level(ph, 9)[1]
    centre_x = np.array([np.nonzero((ph.labels[k] > 0).any(axis=0))[0].mean() if (ph.labels[k] > 0).any()
                         else np.nan for k in range(t.shape[0])])
    centre_x = pd.Series(centre_x).interpolate(limit_direction="both").to_numpy()
    cols = np.arange(t.shape[2])[None, :]
    lateral = np.abs(cols - centre_x[:, None]) * ps > 45.0  # (z, x)
    girdle = (t == Tissue.BONE) & lateral[:, None, :]
    girdle[:c5_top] = False  # the skull and jaws are lateral too
    first = slices_of(girdle)[0]
    assert c7_top - int(12 / dz) <= first <= t1_bottom, (first, c7_top, t1_bottom)
    assert slices_of(girdle)[-1] >= t2_bottom - 2  # the scapulae and humeri go on down
    # Lung apices: not above C7, present through T1.
    lung = slices_of(t == Tissue.LUNG)
    assert lung.min() >= c7_top and lung.min() <= t1_top + int(10 / dz)
    assert set(range(t1_top + int(10 / dz), t1_bottom + 1)) <= set(lung.tolist())


def test_each_tissue_has_its_literature_hu(head_phantom) -> None:
    _, ph = head_phantom
    checked = 0
    for tissue, (low, high) in HU_RANGES.items():
        mask = ndimage.binary_erosion(ph.tissue == tissue, iterations=1)  # away from partial volume
        if tissue in (Tissue.AIR, Tissue.METAL) or mask.sum() < 20:
            continue
        median = float(np.median(ph.hu[mask]))
        assert low - 12.0 <= median <= high + 12.0, (tissue.name, median)  # ± the nucleus/disc and muscle shifts
        checked += 1
    assert checked >= 12
    assert np.median(ph.hu[ndimage.binary_erosion(ph.tissue == Tissue.AIR, iterations=2)]) <= -990
    for tissue in (Tissue.BONE, Tissue.VERTEBRA):
        values = ph.hu[ph.tissue == tissue]
        assert BONE_HU["trabecular"][0] <= np.median(values) <= BONE_HU["cortex"][1], tissue.name
        assert np.percentile(values, 95) >= 700  # a cortex
    assert np.median(ph.hu[ph.tissue == Tissue.TOOTH]) >= BONE_HU["dentin"][0]
    assert CONTRAST_HU_RANGES[Tissue.ARTERY][0] > HU_RANGES[Tissue.ARTERY][1]


def test_metal_fillings_saturate_and_streak_their_slices() -> None:
    cfg = SynthConfig(**{**CLEAN, "image_size": 96, "dental_metal_fraction": 1.0})
    ph = make_phantom(cfg, np.random.default_rng(3), fov="neck")
    metal = ph.tissue == Tissue.METAL
    assert metal.any() and (ph.hu[metal] == 3071).all()
    muscle = ph.tissue == Tissue.MUSCLE
    streaked = slices_of(metal)
    clean = np.setdiff1d(slices_of(muscle), streaked)
    spread = [np.std(ph.hu[z][muscle[z]]) for z in streaked]
    calm = [np.std(ph.hu[z][muscle[z]]) for z in clean]
    assert min(spread) > 5 * max(calm) and max(calm) < 15  # no noise, so only streaks spread the values


def test_same_seed_same_study_and_another_window_shows_the_same_patient() -> None:
    cfg = SynthConfig(image_size=48)
    first = make_phantom(cfg, np.random.default_rng(11))
    again = make_phantom(cfg, np.random.default_rng(11))
    assert np.array_equal(first.hu, again.hu) and np.array_equal(first.tissue, again.tissue)
    assert np.array_equal(first.labels, again.labels) and first.fov == again.fov
    assert not np.array_equal(make_phantom(cfg, np.random.default_rng(12)).hu[:8], first.hu[:8])
    # One patient, two windows: C1's top lies at the same depth below the vertex in both.
    fine = replace(cfg, slice_thickness_mm=(1.0, 1.0), thick_slice_fraction=0.0)
    neck = make_phantom(fine, np.random.default_rng(11), fov="neck")
    head = make_phantom(fine, np.random.default_rng(11), fov="head")
    depth = [p.scan_top_mm + level(p, 1)[0] * p.spacing[0] for p in (neck, head)]
    assert abs(depth[0] - depth[1]) <= 1.0 and head.scan_top_mm < neck.scan_top_mm
    assert depth[1] == pytest.approx(HEAD_HEIGHT_MM, rel=0.2)


@pytest.mark.parametrize("kind", ["head", "neck", "slab"])
def test_window_kinds_cover_what_they_promise(kind: str) -> None:
    cfg = SynthConfig(image_size=32, thoracic_vertebrae=(1, 3), neck_top_mm=(10.0, 60.0), slab_slices=(5, 9))
    for seed in range(12):
        ph = make_phantom(cfg, np.random.default_rng(seed), fov=kind)
        dz = ph.spacing[0]
        labels = [int(v) for v in np.unique(ph.labels) if v]
        if kind == "slab":
            assert 5 <= ph.hu.shape[0] <= 9
            continue
        # Ends in T1..T3; the next vertebra's superior facets may show in the last slices.
        assert labels[:7] == list(range(1, 8)) and 8 <= labels[-1] <= 11
        if labels[-1] == 11:
            assert (ph.labels == 11).sum() < 0.25 * (ph.labels == 10).sum()
        c1_top = level(ph, 1)[0]
        if kind == "neck":
            assert 10.0 - 2 * dz <= c1_top * dz <= 60.0 + 2 * dz
        else:
            assert ph.scan_top_mm < 25.0 and c1_top * dz > 100.0


def test_fov_shares_and_slice_spacing_ranges() -> None:
    cfg = SynthConfig(fov_head_fraction=0.3, fov_slab_fraction=0.2, slice_thickness_mm=(0.5, 1.0),
                      thick_slice_fraction=0.25, thick_slice_mm=(3.0, 5.0), wide_fov_fraction=0.5)
    rng = np.random.default_rng(0)
    kinds = pd.Series([draw_fov_kind(cfg, rng) for _ in range(4000)]).value_counts(normalize=True)
    assert kinds["head"] == pytest.approx(0.3, abs=0.03) and kinds["slab"] == pytest.approx(0.2, abs=0.03)
    windows = [plan_window(cfg, np.random.default_rng(k), "neck", skull_base=150.0, chest_end=350.0,
                           anatomy_end=380.0) for k in range(400)]
    dz = np.array([w.dz for w in windows])
    assert dz.min() >= 0.5 and dz.max() <= 5.0
    assert ((dz >= 3.0).mean()) == pytest.approx(0.25, abs=0.07) and not ((dz > 1.0) & (dz < 3.0)).any()
    assert all(w.bottom == pytest.approx(350.0, abs=w.dz) for w in windows)
    ps = np.array([w.ps for w in windows])
    assert ps.max() > 0.9 * 1.3 and np.mean([w.wide for w in windows]) == pytest.approx(0.5, abs=0.08)
    # Forcing the slice count (tests, benchmarks) adapts the spacing to the coverage.
    forced = plan_window(replace(cfg, n_slices=(40, 40)), np.random.default_rng(1), "head", 150.0, 350.0, 380.0)
    assert forced.nz == 40 and forced.dz == pytest.approx((350.0 - forced.top) / 40, abs=1e-3)


def test_a_slab_reports_only_the_fractures_it_shows() -> None:
    cfg = SynthConfig(image_size=48, slab_slices=(12, 12), slice_thickness_mm=(2.0, 2.0), thick_slice_fraction=0.0)
    everything = {name: 1 for name in VERTEBRAE}
    seen_partial = seen_none = False
    for seed in range(40):
        ph = make_phantom(cfg, np.random.default_rng(seed), fractured=everything, fov="slab")
        for k, name in enumerate(VERTEBRAE, start=1):
            shown = name in ph.fracture_masks and ph.fracture_masks[name].any()
            assert ph.fractured[name] == int(shown), (seed, name)
            if not (ph.labels == k).any():
                assert ph.fractured[name] == 0
        seen_none |= not ph.patient_overall
        seen_partial |= 0 < sum(ph.fractured.values()) < 7
    assert seen_none and seen_partial


def test_switches_remove_head_and_shoulders() -> None:
    cfg = SynthConfig(**{**CLEAN, "image_size": 64, "head_anatomy": False, "shoulder_anatomy": False})
    ph = make_phantom(cfg, np.random.default_rng(7), fov="head")
    for tissue in (Tissue.GREY_MATTER, Tissue.TOOTH, Tissue.EYE):
        assert not (ph.tissue == tissue).any()
    full = make_phantom(replace(cfg, head_anatomy=True, shoulder_anatomy=True), np.random.default_rng(7), fov="head")
    assert (full.tissue == Tissue.BONE).sum() > 3 * (ph.tissue == Tissue.BONE).sum()
    assert np.array_equal(full.labels, ph.labels)  # the vertebrae do not move


def test_config_checks_the_new_knobs() -> None:
    with pytest.raises(ConfigError, match="fov_head_fraction"):
        SynthConfig(fov_head_fraction=0.7, fov_slab_fraction=0.5)
    with pytest.raises(ConfigError, match="slab_slices"):
        SynthConfig(slab_slices=(1, 4))
    with pytest.raises(ConfigError, match="wide_fov_scale"):
        SynthConfig(wide_fov_scale=(0.5, 1.0))
    with pytest.raises(ConfigError, match="dental_metal_fraction"):
        SynthConfig(dental_metal_fraction=2.0)
    assert SynthConfig(neck_top_mm=[20, 30]).neck_top_mm == (20.0, 30.0)


def test_few_slice_studies_train_only_and_are_listed(tmp_path: Path) -> None:
    cfg = SynthConfig(n_studies=8, seed=4, image_size=32, n_slices=(10, 12), test_fraction=0.25,
                      fov_slab_fraction=0.5, compressed_fraction=0.0)
    table = write_dataset(tmp_path, cfg, progress=False)
    studies = pd.read_csv(tmp_path / "synth_studies.csv")
    assert set(studies["fov"]) <= {"head", "neck", "slab"} and (studies["fov"] == "slab").any()
    assert (studies.loc[studies["split"] == "test", "fov"] != "slab").all()
    assert (table["split"] == "test").sum() == 2
    slabs = studies[studies["fov"] == "slab"]
    assert slabs["n_slices"].between(cfg.slab_slices[0], cfg.slab_slices[1]).all()


def test_overview_figure_shows_the_levels(head_phantom, tmp_path: Path) -> None:
    _, ph = head_phantom
    levels = axial_levels(ph)
    assert all(z is not None for z in levels.values())
    assert levels["skull base"] < level(ph, 1)[0] <= level(ph, 2)[0] < levels["C2"] < levels["C5"] < levels["T1"]
    path = overview_figure(ph, tmp_path / "overview.png", title="test")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 300_000


def test_plan_skeleton_places_the_vertex_above_the_spine() -> None:
    cfg = SynthConfig(image_size=64, fov_head_fraction=1.0, fov_slab_fraction=0.0)
    sk = plan_skeleton(cfg, np.random.default_rng(0), np.random.default_rng(1))
    assert sk.window.kind == "head"
    vertex = sk.skull_base - sk.head_height
    assert vertex == pytest.approx(-sk.window.top, abs=1e-6)
    assert [v.name for v in sk.vertebrae][-1] == "T4"
