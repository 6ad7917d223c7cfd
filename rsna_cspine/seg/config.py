"""Typed configuration of stage 1 (vertebra segmentation): data, model, augmentation, training."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SegDataConfig:
    """Where the studies are and how they are turned into network inputs.

    Attributes:
        root: Kaggle-layout folder (train.csv, train_images/, segmentations/).
        cache_dir: where one ``<uid>.npz`` per study is cached at ``grid`` resolution.
        grid: network input size ``(D, H, W)``; every study is resampled to it (aspect is not kept).
        hu_window: HU range clipped and mapped to [0, 1]; bone-friendly by default.
        antialias: average (rather than point-sample) voxels when shrinking a study to the grid.
        thoracic: ``background`` folds T1.. into label 0; ``class`` gives them one extra class (8).
        max_studies: use at most this many labelled studies (0 = all); handy for quick runs.
    """

    root: str = "data/rsna"
    cache_dir: str = "work/seg_cache"
    grid: tuple[int, int, int] = (128, 128, 128)
    hu_window: tuple[float, float] = (-400.0, 1600.0)
    antialias: bool = True
    thoracic: str = "background"
    max_studies: int = 0


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
class SegTrainConfig:
    """Optimisation, validation split, budget and DataLoader settings.

    Attributes:
        patch_size: train on random sub-volumes of this size (0 on an axis = whole axis; all 0 = whole
            grid); validation and prediction always see the whole grid.
        patch_foreground: share of patches centred on a vertebra voxel.
        n_folds: GroupKFold folds by study.
        fold_seed: shuffles studies before the fold split (keep it fixed across folds).
        val_every: validate every this many epochs (and always after the last one); early-stopping
            patience counts validations.
        max_minutes: stop before an epoch that would overrun this budget, with the learning-rate
            schedule fitted to the epochs that fit (0 = no budget; see ``engine.TimeBudget``).
        cpu_threads: torch intra-op threads (0 = torch's default). On a CPU shared with other jobs one
            thread can be several times faster than two (no spinning threads waiting for each other).
    """

    epochs: int = 100
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (0, 0, 0)
    patch_foreground: float = 0.75
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-5
    warmup_epochs: int = 2
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    n_folds: int = 5
    fold_seed: int = 42
    patience: int = 20
    val_every: int = 1
    max_minutes: float = 0.0
    num_workers: int = 0
    cpu_threads: int = 0
    amp: bool = True
    grad_clip: float = 1.0


@dataclass
class SegPredictConfig:
    """Inference settings (stored with the checkpoint so prediction matches training).

    Attributes:
        sw_batch_size: windows per forward pass of MONAI's sliding-window inference.
        overlap: window overlap (one window when the grid is the ROI, the default).
        keep_largest_component: keep only the largest connected piece of each vertebra.
        upsample: ``linear`` (argmax of trilinearly interpolated probabilities, smooth boundaries) or
            ``nearest`` (expand the grid label map; fastest) to return to the original resolution.
        chunk_slices: original slices upsampled at a time (bounds memory).
    """

    sw_batch_size: int = 1
    overlap: float = 0.25
    keep_largest_component: bool = True
    upsample: str = "linear"
    chunk_slices: int = 8


@dataclass
class SegConfig:
    """Everything one stage-1 training run needs; resolved and saved as ``run_dir/config.yaml``.

    Attributes:
        run_dir: output folder; ``{fold}`` is replaced by the fold number.
        fold: validation fold (0..n_folds-1); ``-1`` trains on every study without validation.
        seed: seeds weights, fold split, data order and augmentation.
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
    """

    run_dir: str = "runs/seg/fold{fold}"
    fold: int = 0
    seed: int = 42
    device: str = "auto"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    augment: SegAugmentConfig = field(default_factory=SegAugmentConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    predict: SegPredictConfig = field(default_factory=SegPredictConfig)
