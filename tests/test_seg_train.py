"""Stage-1 training: real optimisation on tiny toy studies, resume, run-folder files, augmentation rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rsna_cspine.seg.config import SegAugmentConfig, SegConfig, SegDataConfig, SegModelConfig
from rsna_cspine.seg.data import build_transforms, make_dataset, make_loader
from rsna_cspine.seg.train import fit_segmentation, split_studies
from tests.toy_seg import GRID, tiny_seg_config, write_toy_cache


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    torch.set_num_threads(1)
    return write_toy_cache(tmp_path_factory.mktemp("cache"), 6, seed=0)


def test_training_lowers_the_loss_and_writes_the_run_folder(toy_cache, tmp_path) -> None:
    run_dir = fit_segmentation(tiny_seg_config(tmp_path / "run", epochs=6), toy_cache[:4], toy_cache[4:], progress=False)
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    expected = {"train_loss", "val_loss", "val_dice_mean", "lr", "time_s"} | {f"val_dice_C{k}" for k in range(1, 8)}
    assert expected <= set(summary.columns)
    assert summary["train_loss"].iloc[-1] < 0.8 * summary["train_loss"].iloc[0]
    assert summary["val_loss"].iloc[-1] < summary["val_loss"].iloc[0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["channels"] == [4, 8, 16]
    for name in ("last.pt", "best.pt", "curves.png"):
        assert (run_dir / name).is_file()
    last = torch.load(run_dir / "last.pt", weights_only=False)
    assert last["epoch"] == 6 and last["optimizer"] is not None and last["rng"] is not None
    assert last["best_score"] == pytest.approx(summary["val_dice_mean"].max(), abs=1e-5)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(toy_cache, tmp_path) -> None:
    straight = fit_segmentation(tiny_seg_config(tmp_path / "a", epochs=3), toy_cache[:4], toy_cache[4:], progress=False)
    # A budget of ~0 stops cleanly after the first epoch; resuming finishes the same 3-epoch schedule.
    part = fit_segmentation(
        tiny_seg_config(tmp_path / "b", epochs=3, max_minutes=1e-6), toy_cache[:4], toy_cache[4:], progress=False
    )
    assert pd.read_csv(part / "summary.csv")["epoch"].tolist() == [1]
    resumed = fit_segmentation(
        tiny_seg_config(tmp_path / "b", epochs=3), toy_cache[:4], toy_cache[4:], resume=True, progress=False
    )
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert b["epoch"] == 3
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    assert pd.read_csv(resumed / "summary.csv")["epoch"].tolist() == [1, 2, 3]


def test_a_finished_run_folder_is_not_overwritten_without_resume(toy_cache, tmp_path) -> None:
    from rsna_cspine.errors import ConfigError

    fit_segmentation(tiny_seg_config(tmp_path / "r", epochs=1), toy_cache[:2], [], progress=False)
    with pytest.raises(ConfigError, match="resume"):
        fit_segmentation(tiny_seg_config(tmp_path / "r", epochs=1), toy_cache[:2], [], progress=False)


def test_augmentation_never_flips_z_and_keeps_labels_on_the_image(toy_cache) -> None:
    aug = SegAugmentConfig(affine_prob=1.0, flip_x_prob=0.5, noise_prob=0.0,
                           intensity_scale_prob=0.0, intensity_shift_prob=0.0, randomise=False)
    dataset = make_dataset(toy_cache[:2], build_transforms(aug, GRID, "background", train=True))
    for epoch in range(4):
        for batch in make_loader(dataset, batch_size=1, shuffle=True, seed=0, epoch=epoch):
            label = batch["label"][0, 0].numpy()
            image = batch["image"][0, 0].numpy()
            z_c1 = np.nonzero(label == 1)[0].mean()
            z_c7 = np.nonzero(label == 7)[0].mean()
            assert z_c1 < z_c7  # C1 stays superior
            # Labelled voxels are the bright ones (the toy image is 0.5 inside, 0.1 outside).
            assert image[label > 0].mean() > image[label == 0].mean() + 0.25


def test_patches_have_the_patch_size_and_mostly_show_vertebrae(toy_cache) -> None:
    transform = build_transforms(SegAugmentConfig(enabled=False), GRID, "background", train=True,
                                 patch_size=(0, 16, 16), patch_foreground=1.0)
    dataset = make_dataset(toy_cache, transform)
    batches = list(make_loader(dataset, batch_size=2, shuffle=True, seed=0, epoch=0))
    for batch in batches:
        assert batch["image"].shape[2:] == (32, 16, 16) and batch["label"].shape[2:] == (32, 16, 16)
        assert (batch["label"] > 0).flatten(1).any(1).all()  # centred on a vertebra voxel
    val = build_transforms(SegAugmentConfig(), GRID, "background", train=False, patch_size=(0, 16, 16))
    assert make_dataset(toy_cache[:1], val)[0]["image"].shape[1:] == GRID


def test_loader_order_depends_only_on_seed_and_epoch(toy_cache) -> None:
    dataset = make_dataset(toy_cache, build_transforms(SegAugmentConfig(), GRID, "background", train=True))

    def draw(epoch: int) -> list[torch.Tensor]:
        return [b["image"] for b in make_loader(dataset, batch_size=2, shuffle=True, seed=3, epoch=epoch)]

    first, again, other = draw(0), draw(0), draw(1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_split_studies_is_a_partition_by_fold() -> None:
    uids = [f"1.2.{i}" for i in range(10)]
    seen: list[str] = []
    for fold in range(5):
        train, val = split_studies(uids, fold, 5, seed=1)
        assert set(train).isdisjoint(val) and set(train) | set(val) == set(uids)
        seen += val
    assert sorted(seen) == sorted(uids)
    assert split_studies(uids, -1, 5, seed=1) == (uids, [])


@pytest.mark.parametrize("name", ["unet", "segresnet"])
def test_both_networks_map_a_grid_to_class_logits(name) -> None:
    from rsna_cspine.seg.model import build_model

    cfg = SegModelConfig(name=name, channels=(4, 8, 16), strides=(2, 2), init_filters=8, blocks_down=(1, 1, 1),
                         blocks_up=(1, 1))
    with torch.no_grad():
        out = build_model(cfg, 9)(torch.zeros(1, 1, 16, 32, 24))
    assert out.shape == (1, 9, 16, 32, 24)


def test_config_errors_name_the_bad_setting(tmp_path) -> None:
    from rsna_cspine.errors import ConfigError
    from rsna_cspine.seg.model import build_model
    from rsna_cspine.seg.train import resolve_config

    with pytest.raises(ConfigError, match="model.name"):
        build_model(SegModelConfig(name="vnet"), 8)
    with pytest.raises(ConfigError, match="data.grid"):
        resolve_config(SegConfig(data=SegDataConfig(grid=(30, 32, 32))))  # the default UNet needs multiples of 16
    with pytest.raises(ConfigError, match="patch_size"):
        cfg = tiny_seg_config(tmp_path, 1)
        cfg.train.patch_size = (0, 10, 16)  # 10 is not a multiple of the tiny UNet's divisor (4)
        resolve_config(cfg)
    with pytest.raises(ConfigError, match="thoracic"):
        resolve_config(SegConfig(data=SegDataConfig(thoracic="drop")))


def test_the_dice_term_is_the_batchs_so_a_vertebra_missing_from_one_patch_is_scored_with_the_others() -> None:
    """The loss's Dice sums over the whole batch (as nnU-Net's batch Dice), checked against the written-out
    formula: C5, absent from the second patch, gets one Dice over both patches, not a Dice of its own in a
    patch that holds none of it (the per-item form, which the loss must differ from)."""
    import torch.nn.functional as F

    from rsna_cspine.seg.task import make_loss

    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 4, 6, 6, generator=rng)
    labels = torch.randint(0, 8, (2, 1, 4, 6, 6), generator=rng)
    labels[1][labels[1] == 5] = 0  # the second patch holds no C5
    loss = make_loss(SegConfig())(logits, labels)
    probs, onehot = torch.softmax(logits, 1), F.one_hot(labels[:, 0], 8).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)  # batch and space: one Dice per class over the batch
    dice = 1 - (2 * (probs * onehot).sum(dims) + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
    expected = dice.mean() + F.cross_entropy(logits, labels[:, 0])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    per_item = 1 - (2 * (probs * onehot).sum((2, 3, 4)) + 1e-5) / (probs.sum((2, 3, 4)) + onehot.sum((2, 3, 4)) + 1e-5)
    assert float(loss) != pytest.approx(float(per_item.mean() + F.cross_entropy(logits, labels[:, 0])), rel=1e-3)
