"""Typed configuration of stage 1 (vertebra segmentation): data, model, augmentation, training, prediction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rsna_cspine.constants import KNOWN_BROKEN_STUDIES
from rsna_cspine.training.config import OptimConfig, RunConfig, TrainConfig


@dataclass
class SegDataConfig:
    """Where the studies are and how they are turned into network inputs.

    Attributes:
        root: Kaggle-layout folder (train.csv, segmentations/; the images are read by ``prepare`` only).
        cache_dir: the prepared cache (``rsna-cspine prepare``) whose ``seg/<uid>.npz`` hold each study's
            stage-1 input; it must have been prepared with this ``grid``, ``hu_window``, ``antialias`` (and,
            with the cascade, ``spacing``, ``box_margin_mm`` and ``localiser.spacing``).
        grid: network input size ``(D, H, W)``.
        spacing: mm per grid voxel ``(z, y, x)`` of the cascade's fine pass: the grid covers a box of
            ``grid × spacing`` mm around the neck that the localiser found (``localiser``), so every scan
            is seen at the same scale. Empty: the whole study is resampled to the grid (aspect not kept),
            as checkpoints written before the cascade were trained.
        box_margin_mm: the prepared cache stores the fine box this much larger on each side ``(z, y, x)``;
            training crops the grid from it at random, as if the localiser had missed the neck's centre
            by up to this much.
        reference_neck_mm: with the cascade, the neck length (C1's centre to C7's centre along z,
            ``seg.masks.neck_length_mm``) for which the fine box is ``grid × spacing`` mm; a longer or
            shorter neck gets a box scaled to it (``seg.boxes.size_scale``): by the true labels in
            training, by a first pass's labels in prediction, so every patient's neck fills the grid
            alike. 0: one box size in mm for every patient.
        hu_window: HU range clipped and mapped to [0, 1]; bone-friendly by default.
        antialias: average (rather than point-sample) voxels when shrinking a study to the grid.
        thoracic: ``background`` folds T1.. into label 0; ``class`` gives them one extra class (8).
        max_studies: use at most this many labelled studies (0 = all); handy for quick runs.
        extra: more RSNA-layout folders whose segmented studies join the training (``rsna-cspine
            import-labels`` writes them: VerSe, TotalSegmentator, CTSpine1K); each is cached in
            ``cache_dir/extra{i}`` and split into folds with the ``root`` studies.
        exclude: StudyInstanceUIDs never used for training (default: the real data set's known broken
            scans, see README).
    """

    root: str = "data/rsna"
    cache_dir: str = "work/prepared"
    grid: tuple[int, int, int] = (128, 128, 128)
    spacing: tuple[float, ...] = ()
    box_margin_mm: tuple[float, float, float] = (30.0, 20.0, 20.0)
    reference_neck_mm: float = 0.0
    hu_window: tuple[float, float] = (-400.0, 1600.0)
    antialias: bool = True
    thoracic: str = "background"
    max_studies: int = 0
    extra: list[str] = field(default_factory=list)
    exclude: tuple[str, ...] = KNOWN_BROKEN_STUDIES

    @property
    def cascade(self) -> bool:
        """The fine pass covers a fixed box in mm around the localised neck (``spacing`` is set)."""
        return len(self.spacing) > 0


@dataclass
class SegModelConfig:
    """The MONAI network. ``name`` is ``unet`` or ``segresnet``; other fields apply to the one named."""

    name: str = "unet"
    channels: tuple[int, ...] = (32, 64, 128, 256, 320)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0
    init_filters: int = 16
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)


@dataclass
class SegLocaliserConfig:
    """The cascade's coarse pass: a small network that finds the cervical spine in the whole scan.

    It sees the whole study at ``spacing`` mm per voxel (windows of ``grid`` voxels slide over scans
    larger than that) and labels "cervical spine" against everything else; the fine pass then covers
    ``data.grid × data.spacing`` mm around what it found. It trains in the same run as the fine network,
    before it, on the same studies, and travels inside the fine network's checkpoints.

    Attributes:
        enabled: use the cascade (needs ``data.spacing``).
        spacing: mm per voxel ``(z, y, x)`` of the coarse pass.
        grid: coarse network input ``(D, H, W)`` (training crops and sliding windows).
        model: its network (small: a few voxels per vertebra is all it needs).
        epochs: planned epochs (a time budget shortens them).
        time_share: share of ``train.max_minutes`` left after data preparation that it may use.
        patch_foreground: share of training crops centred on a cervical voxel.
    """

    enabled: bool = False
    spacing: tuple[float, float, float] = (6.0, 4.0, 4.0)
    grid: tuple[int, int, int] = (48, 64, 64)
    model: SegModelConfig = field(default_factory=lambda: SegModelConfig(
        channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=0))
    epochs: int = 60
    time_share: float = 0.2
    patch_foreground: float = 0.5


@dataclass
class SegAugmentConfig:
    """MONAI dictionary augmentations. No flips along z: C1 must stay at the top of the volume.

    Attributes:
        randomise: SynthSeg-style domain randomisation (``seg.randomise``), applied to training images
            only, after the spatial augmentations: the fields below up to ``gamma``.
        hu_remap_prob: probability of a random, possibly non-monotonic intensity per HU band.
        hu_remap_min_contrast: least distance (window units) of the bone bands from soft tissue.
        bias_field_prob: probability of a smooth multiplicative bias field (MONAI ``RandBiasField``).
        bias_field_coeff: largest coefficient of its degree-3 polynomial (log scale).
        blur_prob: probability of a Gaussian blur of ``blur_sigma`` voxels (MONAI ``RandGaussianSmooth``).
        low_res_prob: probability of a down- then up-sampling by a zoom in ``low_res_zoom`` (MONAI
            ``RandSimulateLowResolution``): thick slices and soft kernels.
        gamma_prob: probability of a gamma curve with exponent in ``gamma`` (MONAI ``RandAdjustContrast``).
    """

    enabled: bool = True
    affine_prob: float = 0.5
    rotate_rad: tuple[float, float, float] = (0.15, 0.1, 0.1)
    scale: float = 0.1
    translate_frac: float = 0.05
    flip_x_prob: float = 0.5
    noise_prob: float = 0.3
    noise_std: float = 0.03
    intensity_scale_prob: float = 0.3
    intensity_scale: float = 0.1
    intensity_shift_prob: float = 0.3
    intensity_shift: float = 0.05
    randomise: bool = True
    hu_remap_prob: float = 0.4
    hu_remap_min_contrast: float = 0.15
    bias_field_prob: float = 0.3
    bias_field_coeff: float = 0.3
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.25, 1.0)
    low_res_prob: float = 0.15
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    gamma_prob: float = 0.3
    gamma: tuple[float, float] = (0.6, 1.6)


@dataclass
class SegTrainConfig(TrainConfig):
    """The shared loop settings (:class:`~rsna_cspine.training.config.TrainConfig`) plus stage 1's own.

    Attributes:
        patch_size: train on random sub-volumes of this size (0 on an axis = whole axis; all 0 = whole
            grid); validation and prediction always see the whole grid.
        patch_foreground: share of patches centred on a vertebra voxel.
        lambda_dice: weight of the Dice term of the loss.
        lambda_ce: weight of the cross-entropy term.
    """

    epochs: int = 100
    batch_size: int = 2
    val_batch_size: int = 1
    grad_clip: float = 1.0
    patience: int = 20
    num_workers: int = 0
    patch_size: tuple[int, int, int] = (0, 0, 0)
    patch_foreground: float = 0.75
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0


@dataclass
class SegPredictConfig:
    """Inference settings (stored with the checkpoint so prediction matches training).

    Attributes:
        sw_batch_size: windows per forward pass of MONAI's sliding-window inference.
        roi_size: the fine network's sliding window on the grid, ``0`` = the grid's size on that axis (one
            window, the default). Set it to ``train.patch_size`` when the network trains on patches: its
            instance norms then see at prediction what they saw in training (nnU-Net's rule); on the whole
            128² grid a network trained on 48² patches scored 0.03 Dice lower (evidence.md, "Stage 1:
            windows of the training patch").
        overlap: overlap of both networks' sliding windows (the localiser's windows are its grid).
        blend: how overlapping windows are averaged, MONAI's ``mode``: ``constant`` or ``gaussian``
            (nnU-Net's: a window's centre counts more than its edges).
        keep_largest_component: keep only the largest connected piece of each vertebra.
        upsample: ``linear`` (argmax of trilinearly interpolated probabilities, smooth boundaries) or
            ``nearest`` (expand the grid label map; fastest) to return to the original resolution.
        chunk_slices: original slices upsampled at a time (bounds memory).
        mirror: also label the left-right mirrored input and average the two softmaxes (nnU-Net's test-time
            mirroring; the labels are symmetric across the midline). Twice the network's time. Off by
            default so checkpoints saved before it predict as they did.
    """

    sw_batch_size: int = 1
    roi_size: tuple[int, int, int] = (0, 0, 0)
    overlap: float = 0.25
    blend: str = "constant"
    keep_largest_component: bool = True
    upsample: str = "linear"
    chunk_slices: int = 8
    mirror: bool = False


@dataclass
class SegConfig(RunConfig):
    """Everything one stage-1 training run needs; resolved and saved as ``config.yaml`` in the fold's folder.

    Attributes:
        run_dir: experiment folder; fold ``K`` trains in ``run_dir/fold{K}`` (``run_dir/all`` for -1).
        fold: validation fold (0..n_folds-1); ``-1`` trains on every study without validation.
        seed: seeds weights, fold split, data order and augmentation.
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
    """

    #: Keys of configs written before the common schema (old → new); checkpoints carrying them still load.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        "augment": "aug",
        "train.cpu_threads": "train.threads",
        "train.lr": "optim.lr",
        "train.min_lr": "optim.min_lr",
        "train.weight_decay": "optim.weight_decay",
        "train.warmup_epochs": "optim.warmup_epochs",
    }

    run_dir: str = "runs/seg"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    aug: SegAugmentConfig = field(default_factory=SegAugmentConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=1e-5, warmup_epochs=2,
                                                                   warmup_lr=1e-4, min_lr=1e-5))
    predict: SegPredictConfig = field(default_factory=SegPredictConfig)
    localiser: SegLocaliserConfig = field(default_factory=SegLocaliserConfig)

    @staticmethod
    def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
        """What renaming alone cannot say: old stage-1 configs named the fold folder in ``run_dir``
        (``runs/seg/fold{fold}``) and warmed up from a tenth of the peak learning rate."""
        run_dir = data.get("run_dir")
        if isinstance(run_dir, str) and "{fold}" in run_dir:
            data["run_dir"] = run_dir.replace("/fold{fold}", "").replace("{fold}", str(data.get("fold", 0)))
        optim = data.get("optim")
        if isinstance(optim, dict) and "lr" in optim and "warmup_lr" not in optim:
            optim["warmup_lr"] = round(float(optim["lr"]) / 10, 12)
        return data
