"""HU windowing (``io.window.window_hu``, MONAI ``ScaleIntensityRange``) against the formulas it replaced.

Each stage once wrote the window itself; the references below are those formulas, applied to a real CT
(the TotalSegmentator example series) with the windows the shipped configs use.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsna_cspine.io.volume import Volume
from rsna_cspine.io.window import window_hu

#: Stage 1's window and the stage-2 crop windows of configs/cls_cpu.yaml.
SHIPPED_WINDOWS = [(-400.0, 1600.0), (-400.0, 1500.0), (-100.0, 600.0)]


@pytest.mark.parametrize("window", SHIPPED_WINDOWS)
def test_bit_identical_to_the_stage_formulas_on_a_real_ct(real_ct: Volume, window: tuple[float, float]) -> None:
    hu = real_ct.hu
    before = hu.copy()
    assert hu.dtype == np.float32 and hu.min() < window[0] and hu.max() > window[1]  # both clips are exercised
    low, high = window
    block = torch.from_numpy(hu)
    stage1 = (block.clamp(low, high) - low) / (high - low)  # seg/preprocess: clamp, then scale
    stage2 = np.clip((hu - low) / (high - low), 0.0, 1.0)  # crops/extract and the pictures: scale, then clip
    from_tensor, from_array = window_hu(block, window), window_hu(hu, window)
    assert isinstance(from_tensor, torch.Tensor) and type(from_tensor) is torch.Tensor  # no MetaTensor leaks out
    assert isinstance(from_array, np.ndarray) and from_array.dtype == np.float32
    assert torch.equal(from_tensor, stage1)
    np.testing.assert_array_equal(from_array, stage2)
    np.testing.assert_array_equal(hu, before)  # the input (shared with the tensor) is left as it was


def test_the_2d_percentile_window_matches_its_float64_formula_to_one_float32_step(real_ct: Volume) -> None:
    hu = real_ct.hu[real_ct.hu.shape[0] // 2]
    low, high = np.percentile(hu, [0.5, 99.5])  # float64 bounds: the old code computed in float64
    reference = np.clip((hu - low) / (high - low), 0.0, 1.0).astype(np.float32)
    np.testing.assert_allclose(window_hu(hu, (low, high)), reference, rtol=0, atol=np.finfo(np.float32).eps)


def test_ends_and_order_of_the_mapping() -> None:
    hu = np.array([-3000.0, -400.0, 600.0, 1600.0, 4000.0], dtype=np.float32)
    np.testing.assert_array_equal(window_hu(hu, (-400.0, 1600.0)), [0.0, 0.0, 0.5, 1.0, 1.0])
    ints = np.arange(-1024, 3072, 7, dtype=np.int16)  # stored values: computed in float32 all the same
    out = window_hu(ints, (-400.0, 1600.0))
    assert out.dtype == np.float32 and (np.diff(out) >= 0).all()
    with pytest.raises(ValueError, match="high > low"):
        window_hu(hu, (100.0, 100.0))
