"""Tissue classes of the phantom, their Hounsfield units, and the painter that writes both.

Every voxel of a phantom belongs to one ``Tissue``; the generator paints HU and tissue together, so a
study carries its tissue map (``Phantom.tissue``) beside the vertebra labels. Each study draws one HU
value per tissue from the range below (patients, scanners and kV differ), except bone, whose HU
comes from the bone model (cortex over trabecular texture, see ``bone.bone_density``).

Figures (unenhanced CT at 100–140 kV unless said otherwise):

- air −1000 (by definition); lung parenchyma −900…−750 (Kalender WA, *Computed Tomography*, 3rd ed.,
  Publicis 2011, HU scale chart; apical lung of a supine patient is well aerated);
- fat −120…−80 and muscle 35…60 (Kalender 2011: fat ≈ −100, muscle ≈ 40);
- water-like: CSF 0…15, vitreous 0…20;
- brain: grey matter 34…44, white matter 22…32 (Kalender 2011: grey 35–45, white 20–30);
- blood 35…55; with iodinated contrast (``SynthConfig.contrast_fraction``) arteries 200…350 and veins
  120…200, the usual range of contrast-enhanced neck CT;
- thyroid 80…120 from its iodine content (Imanishi Y et al., *J Comput Assist Tomogr*
  2000;24:322–326: normal glands ≈ 100 HU), 120…160 enhanced;
- hyaline cartilage 60…200 (laryngeal and costal cartilage; ossified islands are drawn denser);
- intervertebral disc 60…100; spinal cord 25…40;
- bone: trabecular 150…450 and cortex 700…1900 (Kalender 2011: compact bone > 1000; lumbar trabecular
  bone of adults ≈ 130–300 in Schreiber JJ et al., *J Bone Joint Surg Am* 2011;93:1057–1063, the
  cervical bodies run denser); petrous bone, the densest of the skull, 1500…2200;
- teeth: enamel 2500…3000 and dentin 1600…2200 (enamel is the most mineralised tissue of the body);
- metal (amalgam fillings, crowns) saturates the 12-bit scale at 3071 HU and throws dark and bright
  streaks across its slices (Barrett JF, Keat N, *RadioGraphics* 2004;24:1679–1691).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Tissue class of a voxel (``Phantom.tissue`` values)."""

    AIR = 0
    LUNG = 1
    FAT = 2
    MUSCLE = 3
    BLOOD = 4
    ARTERY = 5
    VEIN = 6
    CSF = 7
    GREY_MATTER = 8
    WHITE_MATTER = 9
    CORD = 10
    EYE = 11
    THYROID = 12
    CARTILAGE = 13
    DISC = 14
    BONE = 15  # any bone that is not a vertebra: skull, mandible, hyoid, clavicle, ribs, ...
    VERTEBRA = 16
    TOOTH = 17
    METAL = 18
    COUCH = 19


#: Per-study HU range of each soft tissue (bone HU come from the bone model); see the module docstring.
HU_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, -1000.0),
    Tissue.LUNG: (-900.0, -750.0),
    Tissue.FAT: (-120.0, -80.0),
    Tissue.MUSCLE: (35.0, 60.0),
    Tissue.BLOOD: (35.0, 55.0),
    Tissue.ARTERY: (35.0, 55.0),
    Tissue.VEIN: (35.0, 55.0),
    Tissue.CSF: (0.0, 15.0),
    Tissue.GREY_MATTER: (34.0, 44.0),
    Tissue.WHITE_MATTER: (22.0, 32.0),
    Tissue.CORD: (25.0, 40.0),
    Tissue.EYE: (0.0, 20.0),
    Tissue.THYROID: (80.0, 120.0),
    Tissue.CARTILAGE: (60.0, 200.0),
    Tissue.DISC: (60.0, 100.0),
    Tissue.METAL: (3071.0, 3071.0),
}
#: With iodinated contrast (``SynthConfig.contrast_fraction``).
CONTRAST_HU_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.ARTERY: (200.0, 350.0),
    Tissue.VEIN: (120.0, 200.0),
    Tissue.THYROID: (120.0, 160.0),
}
#: HU of the mineralised tissues (bone model inputs and checks).
BONE_HU = {"trabecular": (150.0, 450.0), "cortex": (700.0, 1900.0), "petrous": (1500.0, 2200.0),
           "enamel": (2500.0, 3000.0), "dentin": (1600.0, 2200.0)}


def draw_tissue_hu(rng: np.random.Generator, contrast: bool) -> dict[Tissue, float]:
    """One HU value per soft tissue for a study (a fixed number of draws, in ``Tissue`` order).

    Args:
        rng: the study's anatomy stream.
        contrast: use the enhanced ranges for vessels and thyroid.
    """
    out: dict[Tissue, float] = {}
    for tissue, (low, high) in HU_RANGES.items():
        if contrast and tissue in CONTRAST_HU_RANGES:
            low, high = CONTRAST_HU_RANGES[tissue]
        out[tissue] = float(rng.uniform(low, high))
    return out


class Painter:
    """Writes HU and tissue class together; later paint wins, as in a painter's algorithm.

    Attributes:
        hu: float32 ``(z, y, x)`` HU volume.
        tissue: uint8 ``(z, y, x)`` ``Tissue`` map.
        values: the study's HU per soft tissue (``draw_tissue_hu``).
    """

    def __init__(self, shape: tuple[int, int, int], values: dict[Tissue, float]) -> None:
        self.hu = np.full(shape, values[Tissue.AIR], dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.values = values

    def fill(self, index: tuple, mask: np.ndarray, tissue: Tissue, hu: float | np.ndarray | None = None,
             where: np.ndarray | None = None) -> None:
        """Paint ``tissue`` where ``mask`` holds inside the block ``index``.

        Args:
            index: a block of the volume (tuple of slices or ints).
            mask: bool array broadcastable to the block.
            tissue: the class written.
            hu: HU written: None = the study's value of ``tissue``, a float, or an array of the block's
                shape (only its masked voxels are used).
            where: optional extra condition on the block's current tissue map (bool array of the block).
        """
        hu_view, tissue_view = self.hu[index], self.tissue[index]
        mask = np.broadcast_to(mask, hu_view.shape)
        if where is not None:
            mask = mask & where
        if hu is None:
            hu = self.values[tissue]
        if isinstance(hu, np.ndarray):
            hu_view[mask] = np.broadcast_to(hu, hu_view.shape)[mask]
        else:
            hu_view[mask] = hu
        tissue_view[mask] = int(tissue)

    def is_(self, index: tuple, *tissues: Tissue) -> np.ndarray:
        """Bool map of the block: voxels currently of one of ``tissues``."""
        return np.isin(self.tissue[index], [int(t) for t in tissues])
