"""Hounsfield units → [0, 1] through a ``(low, high)`` window: the one intensity mapping every stage uses.

Stage 1's input, stage 2's crop planes, the 2D mode's DICOM images and the pictures all map HU the same
way: MONAI's ``ScaleIntensityRange`` maps ``low`` → 0 and ``high`` → 1, then values are clipped to [0, 1].
The clip is done in place here rather than by the transform (``clip=True`` with ``b_min=0, b_max=1``): that
form adds a multiply by 1, an add of 0 and a clip that each copy the whole array, and stage 1 windows every
slice of a study at full resolution. The results are bit-identical either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange


@overload
def window_hu(hu: np.ndarray, window: Sequence[float]) -> np.ndarray: ...


@overload
def window_hu(hu: torch.Tensor, window: Sequence[float]) -> torch.Tensor: ...


def window_hu(hu: np.ndarray | torch.Tensor, window: Sequence[float]) -> np.ndarray | torch.Tensor:
    """Map HU to float32 grey levels in [0, 1] through ``window``.

    The values are computed in float32 (a float32 input is not copied before the arithmetic).

    Args:
        hu: Hounsfield units, any shape: a numpy array (→ numpy) or a tensor (→ a plain tensor, same device).
        window: ``(low, high)`` with ``high > low``.

    Returns:
        float32 values in [0, 1], same shape and kind as ``hu``.
    """
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"an HU window needs high > low, got {window}")
    scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=None, b_max=None, dtype=torch.float32)
    values = hu.to(torch.float32) if isinstance(hu, torch.Tensor) else torch.from_numpy(np.asarray(hu, dtype=np.float32))
    out = scale(values)  # a new tensor: the input is never changed
    out = (out.as_tensor() if isinstance(out, MetaTensor) else out).clamp_(0.0, 1.0)
    return out if isinstance(hu, torch.Tensor) else out.numpy()
