"""Stage-2 training: loss, augmentation, a learnable toy task, resume = uninterrupted, OOF file, CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

import rsna_cspine.training.loop as loop_module
from rsna_cspine.aggregate import patient_overall
from rsna_cspine.calibration import (
    PatientCalibration,
    VertebraCalibration,
    cross_fit_patient_overall,
    fit_patient_calibration,
    fit_vertebra_calibration,
)
from rsna_cspine.cli import main as cli_main
from rsna_cspine.cls.config import ClsAugConfig, ClsConfig
from rsna_cspine.cls.data import VertebraDataset, intensity_levels, match_levels, vertebra_items
from rsna_cspine.cls.loss import fracture_loss
from rsna_cspine.cls.model import FractureClassifier
from rsna_cspine.cls.predict import load_classifiers
from rsna_cspine.cls.task import OOF_COLUMNS
from rsna_cspine.cls.train import classifier_data, fold_split, train_classifier, validation_studies
from rsna_cspine.config import load_config, save_config
from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.crops import CropConfig, VertebraCrops, load_crops
from rsna_cspine.engine import fold_of, load_checkpoint
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.prepare import PrepareConfig, PreparedCache, settings_fingerprint
from rsna_cspine.training.augment import StackAugment
from tests.toy_cls import (
    ABSENT_VERTEBRA,
    CHANNELS,
    CROP,
    N_SLICES,
    SIZE,
    absent_study,
    save_prepared,
    tiny_cls_config,
    toy_crop_dataset,
    toy_uid,
)

torch.set_num_threads(1)

def test_weighted_bce_matches_the_competition_weights() -> None:
    logit = torch.tensor([0.3, -1.2, 2.0])
    label = torch.tensor([1.0, 0.0, 0.0])
    softplus = torch.nn.functional.softplus
    expected = (2 * softplus(-logit[0]) + softplus(logit[1]) + softplus(logit[2])) / (2 + 1 + 1)
    total, vertebra = fracture_loss(logit, label)
    torch.testing.assert_close(vertebra, expected)
    torch.testing.assert_close(total, expected)
    # Slice term: mean BCE over known entries only (-1 ignored), scaled by its weight.
    slice_logits = torch.tensor([[0.5, -0.5], [1.0, 9.0], [0.0, 0.0]])
    slice_labels = torch.tensor([[1, 0], [0, -1], [-1, -1]])
    known = (softplus(-slice_logits[0, 0]) + softplus(slice_logits[0, 1]) + softplus(slice_logits[1, 0])) / 3
    total, _ = fracture_loss(logit, label, slice_logits, slice_labels, slice_weight=0.5)
    torch.testing.assert_close(total, expected + 0.5 * known)


def test_augmentation_moves_every_plane_alike_and_leaves_the_mask_unbrightened() -> None:
    aug = StackAugment(ClsAugConfig(rotate_deg=20, brightness=0.3, contrast=0.3, vflip=0.5), SIZE, image_channels=2)
    plane = torch.rand(SIZE, SIZE)
    mask = torch.zeros(SIZE, SIZE)
    mask[8:20, 10:24] = 1.0
    stack = torch.stack([plane, plane, mask])[None].repeat(N_SLICES, 1, 1, 1)  # (N, 3, S, S)
    torch.manual_seed(3)
    out = aug(stack.clone())
    assert out.shape == stack.shape
    for n in range(1, N_SLICES):
        torch.testing.assert_close(out[n], out[0])
    torch.testing.assert_close(out[:, 0], out[:, 1])
    assert out[:, 2].min() == 0.0  # background of the mask plane stays 0: no brightness shift there
    assert not torch.allclose(out[:, 0], stack[:, 0])
    torch.manual_seed(3)
    torch.testing.assert_close(aug(stack.clone()), out)


def test_augmentation_geometry_is_one_exact_affine_map() -> None:
    stack = torch.rand(N_SLICES, 2, SIZE, SIZE)
    still = dict(scale_min=1.0, rotate_deg=0.0, translate=0.0, brightness=0.0, contrast=0.0)
    middle = lambda low, high: (low + high) / 2  # noqa: E731 - every draw at its middle: aspect ratio 1, centred
    identity = StackAugment(ClsAugConfig(hflip=0.0, **still), SIZE, image_channels=2)
    identity._uniform = middle  # type: ignore[method-assign]
    torch.testing.assert_close(identity(stack.clone()), stack)
    mirrored = StackAugment(ClsAugConfig(hflip=1.0, vflip=1.0, **still), SIZE, image_channels=2)
    mirrored._uniform = middle  # type: ignore[method-assign]
    torch.testing.assert_close(mirrored(stack.clone()), stack.flip(-1).flip(-2))
    # A zoom-in crop keeps the centre object centred and larger: a centred square grows.
    square = torch.zeros(1, 1, SIZE, SIZE)
    square[..., 12:20, 12:20] = 1.0
    zoom = StackAugment(ClsAugConfig(hflip=0.0, **{**still, "scale_min": 0.5}), SIZE, image_channels=0)
    torch.manual_seed(0)
    grown = zoom(square.clone())
    assert float(grown.sum()) > 1.3 * float(square.sum())
    # A 90° rotation maps rows to columns (within one pixel of interpolation).
    bar = torch.zeros(1, 1, SIZE, SIZE)
    bar[..., 15:17, 4:28] = 1.0
    turn = StackAugment(ClsAugConfig(hflip=0.0, **{**still, "rotate_deg": 90.0}), SIZE, image_channels=0)
    turn._uniform = lambda low, high: high if high == 90.0 else (low + high) / 2  # type: ignore[method-assign]
    turned = turn(bar.clone())[0, 0]
    assert float(turned[4:28, 14:18].sum()) > 0.9 * float(bar.sum())


def test_degradation_adds_noise_and_blurs_image_planes_only_when_asked() -> None:
    still = dict(scale_min=1.0, rotate_deg=0.0, translate=0.0, brightness=0.0, contrast=0.0, hflip=0.0)
    # A checkerboard of 1-pixel squares: any loss of resolution averages it towards 0.5.
    board = ((torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2).float()
    stack = torch.stack([board, board])[None].repeat(N_SLICES, 1, 1, 1) * 0.5 + 0.25
    off = StackAugment(ClsAugConfig(**still), SIZE, image_channels=2)
    off._uniform = lambda low, high: (low + high) / 2  # type: ignore[method-assign]
    torch.testing.assert_close(off(stack.clone()), stack)

    noisy = StackAugment(ClsAugConfig(**still, noise_std=0.1), SIZE, image_channels=1)
    noisy._uniform = lambda low, high: (low + high) / 2  # type: ignore[method-assign]
    torch.manual_seed(0)
    out = noisy(stack.clone())
    residual = out[:, 0] - stack[:, 0]
    assert 0.0 < float(residual.std()) <= 0.1
    torch.testing.assert_close(out[:, 1], stack[:, 1])  # a trailing mask plane is never degraded

    blurred = StackAugment(ClsAugConfig(**still, low_res_zoom=0.5), SIZE, image_channels=2)
    blurred._uniform = lambda low, high: low  # type: ignore[method-assign] - the strongest shrink
    out = blurred(stack.clone())
    assert float((out - 0.5).abs().mean()) < 0.5 * float((stack - 0.5).abs().mean())
    torch.testing.assert_close(out.mean(), stack.mean(), atol=0.02, rtol=0.0)


def test_dataset_items_and_known_negative_slices(tmp_path) -> None:
    root, cache = toy_crop_dataset(tmp_path, n_studies=4)
    labels = pd.read_csv(f"{root}/train.csv", dtype={"StudyInstanceUID": str})
    items = vertebra_items(labels, {u: f"{cache}/crops/{u}.npz" for u in labels["StudyInstanceUID"]})
    assert len(items) == 4 * 7
    assert items["present"].sum() == 4 * 7 - 1
    assert not items[(items["StudyInstanceUID"] == toy_uid(absent_study(4))) & (items["vertebra"] == ABSENT_VERTEBRA)]["present"].any()
    dataset = VertebraDataset(items[items["present"]])
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["image"].shape == (N_SLICES, CHANNELS, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert int(item["vertebra"]) == int(dataset.items.at[i, "vertebra"])
        if item["label"] == 0:
            assert (item["slice_labels"] == 0).all()
        else:
            assert item["slice_labels"].tolist() == [0, 0, 1, 1, 1, 0]
            assert float(item["image"][2:5, 0].amax(dim=(1, 2)).min()) > 0.85  # the bright square
    # Augmented items move (same draws for every plane) and stay images in [0, 1].
    still = ClsAugConfig(rotate_deg=25.0, brightness=0.0, contrast=0.0, scale_min=0.7, translate=0.1)
    augmented = VertebraDataset(items[items["present"] & (items["label"] == 1)], StackAugment(still, SIZE, CHANNELS), seed=3)
    for i in range(len(augmented)):
        item, plain = augmented[i], VertebraDataset(augmented.items)[i]
        assert not torch.equal(item["image"], plain["image"])
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert item["slice_labels"].tolist() == plain["slice_labels"].tolist()


def test_fracture_paste_copies_a_same_vertebra_donor_box_with_its_labels(tmp_path) -> None:
    root, cache = toy_crop_dataset(tmp_path, n_studies=8)
    labels = pd.read_csv(f"{root}/train.csv", dtype={"StudyInstanceUID": str})
    items = vertebra_items(labels, {u: f"{cache}/crops/{u}.npz" for u in labels["StudyInstanceUID"]})
    items = items[items["present"]].reset_index(drop=True)
    plain = VertebraDataset(items)
    keep = lambda stack: stack  # noqa: E731  (no geometry: pasted pixels stay where the donor had them)
    pasting = VertebraDataset(items, keep, seed=5, paste_prob=1.0, paste_feather=1.0)
    def region(j: int) -> torch.Tensor:
        """Donor ``j``'s boxed fracture region (box maps on its fractured slices), as the cache stores it."""
        _, slices, maps = plain._stack(j)
        return torch.from_numpy(np.asarray(maps, dtype=np.float32) * (np.asarray(slices) > 0)[:, None, None])

    donors = {v: np.flatnonzero((items["label"] == 1) & (items["vertebra"] == v)) for v in range(7)}
    pasted = 0
    for i in np.flatnonzero(items["label"] == 0):
        item, before = pasting[i], plain[i]
        same_vertebra = donors[int(items.at[i, "vertebra"])]
        if not len(same_vertebra):
            assert item["label"] == 0 and torch.equal(item["image"], before["image"])  # nothing to paste
            continue
        pasted += 1
        assert item["label"] == 1 and item["slice_labels"].tolist() == [0, 0, 1, 1, 1, 0]
        # Inside one of this vertebra's donors' regions are that donor's pixels on this stack's levels.
        matches = []
        for j in same_vertebra:
            donor = plain[j]["image"]
            inside = (region(j) > 0.5)[:, None].expand_as(item["image"])
            expected = match_levels(donor, intensity_levels(donor), intensity_levels(before["image"]))
            if torch.allclose(item["image"][inside], expected[inside], atol=1e-6, rtol=0):
                matches.append(j)
        assert matches, i
        box = region(matches[0])
        inside = (box > 0.5)[:, None].expand_as(item["image"])
        assert not torch.equal(item["image"][inside], before["image"][inside])
        # Beyond the blur kernel (4 sigma each way, so up to 4√2 px on a diagonal) the stack is untouched.
        far = torch.from_numpy(ndimage.distance_transform_edt(box.numpy() < 0.5, sampling=(100.0, 1.0, 1.0)) > 6)
        assert torch.equal(item["image"].permute(1, 0, 2, 3)[:, far], before["image"].permute(1, 0, 2, 3)[:, far])
        again = pasting[i]
        assert torch.equal(again["image"], item["image"])  # fixed by (seed, epoch, item)
    assert pasted >= 10
    # Fractured items are never changed, nothing is pasted without augmentation or with paste_prob 0.
    first_positive = int(np.flatnonzero(items["label"] == 1)[0])
    assert torch.equal(pasting[first_positive]["image"], plain[first_positive]["image"])
    for dataset in (VertebraDataset(items, None, paste_prob=1.0), VertebraDataset(items, keep, paste_prob=0.0)):
        assert all(dataset[i]["label"] == items.at[i, "label"] for i in range(len(items)))
    # About paste_prob of the negatives get one, drawn afresh each epoch.
    some = VertebraDataset(items, keep, seed=1, paste_prob=0.5)
    negatives = np.flatnonzero(items["label"] == 0)
    draws = []
    for epoch in range(4):
        some.set_epoch(epoch)
        draws.append([int(some[i]["label"]) for i in negatives])
    share = np.mean(draws)
    assert 0.3 < share < 0.6 and draws[0] != draws[1]
    for key, value in (("aug.paste_prob", 1.5), ("aug.paste_feather", -1.0)):
        with pytest.raises(ConfigError, match="paste"):
            load_config(ClsConfig, None, [f"{key}={value}"]).validate()


def test_level_matching_maps_a_rescaled_stack_back_and_keeps_flat_channels() -> None:
    reference = torch.rand(4, 3, 16, 16) * 0.6 + 0.1
    reference[:, 2] = 0.0  # a flat plane (an empty mask)
    source = (reference * 0.5 + 0.2).clamp(0, 1)
    source[:, 2] = 1.0
    matched = match_levels(source, intensity_levels(source), intensity_levels(reference))
    torch.testing.assert_close(matched[:, :2], reference[:, :2], atol=2e-3, rtol=0)
    assert torch.equal(matched[:, 2], source[:, 2])


def test_loss_falls_on_a_learnable_toy_task(tmp_path) -> None:
    torch.manual_seed(0)
    root, cache = toy_crop_dataset(tmp_path, n_studies=4)
    labels = pd.read_csv(f"{root}/train.csv", dtype={"StudyInstanceUID": str})
    items = vertebra_items(labels, {u: f"{cache}/crops/{u}.npz" for u in labels["StudyInstanceUID"]})
    dataset = VertebraDataset(items[items["present"]].head(16))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    assert 0 < batch["label"].sum() < len(batch["label"])
    model = FractureClassifier("test_resnet", CHANNELS, head="gru", hidden=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        out = model(batch["image"])
        loss, _ = fracture_loss(out["logit"], batch["label"], out["slice_logits"], batch["slice_labels"], 0.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_vertebra_bias_learns_the_base_rates_through_the_training_loop(tmp_path) -> None:
    # Images carry no signal; C7 breaks in most studies and C1 in few: only the offsets can tell them apart.
    rng = np.random.default_rng(4)
    root, cache = tmp_path / "kaggle", tmp_path / "crops"
    root.mkdir()
    rates = np.linspace(0.05, 0.9, 7)
    rows = []
    for s in range(12):
        labels = (rng.random(7) < rates).astype(int)
        crops = VertebraCrops(
            images=rng.integers(0, 80, size=(7, N_SLICES, CHANNELS, SIZE, SIZE)).astype(np.uint8),
            present=np.ones(7, dtype=bool),
            slice_index=np.tile(np.arange(N_SLICES, dtype=np.int32), (7, 1)),
            z_range=np.tile(np.array([0, N_SLICES - 1], dtype=np.int32), (7, 1)),
            boxes=np.tile(np.array([0, SIZE, 0, SIZE], dtype=np.int32), (7, 1)),
            slice_labels=np.full((7, N_SLICES), -1, dtype=np.int8),
        )
        save_prepared(cache, toy_uid(s), crops)
        rows.append({"StudyInstanceUID": toy_uid(s), **dict(zip(VERTEBRAE, labels)), "patient_overall": int(labels.max())})
    pd.DataFrame(rows)[["StudyInstanceUID", *TARGET_COLUMNS]].to_csv(root / "train.csv", index=False)
    cfg = tiny_cls_config(tmp_path, str(root), str(cache), "bias", epochs=3)
    cfg.model.vertebra_bias, cfg.optim.lr = True, 1e-2
    run = train_classifier(cfg)
    bias = torch.load(run / "last.pt", weights_only=False)["model"]["vertebra_bias.weight"].squeeze(1).numpy()
    assert bias[6] - bias[0] > 0.05, bias  # C7 (90 %) above C1 (5 %)
    assert np.corrcoef(bias, rates)[0, 1] > 0.8, bias


def _interrupt_before_epoch(monkeypatch, epoch_to_stop: int) -> None:
    original = loop_module.train_one_epoch

    def interrupted(*args, **kwargs):
        if kwargs["epoch"] == epoch_to_stop:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_one_epoch", interrupted)


def test_resume_equals_uninterrupted_and_oof_is_written(tmp_path, monkeypatch) -> None:
    root, cache = toy_crop_dataset(tmp_path)
    straight = train_classifier(tiny_cls_config(tmp_path, root, cache, "straight"))

    cfg = tiny_cls_config(tmp_path, root, cache, "resumed")
    with monkeypatch.context() as patch:
        _interrupt_before_epoch(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train_classifier(cfg)
    assert load_checkpoint(tmp_path / "resumed" / "fold0" / "last.pt")["epoch"] == 1
    resumed = train_classifier(cfg, resume=True)

    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(resumed / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    summary_a = pd.read_csv(straight / "summary.csv")
    summary_b = pd.read_csv(resumed / "summary.csv")
    assert summary_a["epoch"].tolist() == summary_b["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(summary_a["train_loss"], summary_b["train_loss"], rtol=1e-5)
    for column in ("val_loss", "val_auc", "val_score", "val_score_noisy_or", "prior_score", "lr", "time_s"):
        assert column in summary_a.columns
    assert (straight / "config.yaml").is_file() and (straight / "best.pt").is_file()

    # Out-of-fold file: the validation fold's studies, the prior where a vertebra is absent, and patient_overall
    # by the rule predict uses (calibrated, each study from a fit on the other validation studies) beside
    # plain noisy-OR.
    oof = pd.read_csv(tmp_path / "straight" / "oof_fold0.csv", dtype={"StudyInstanceUID": str})
    assert list(oof.columns) == list(OOF_COLUMNS)
    labels = pd.read_csv(f"{root}/train.csv", dtype={"StudyInstanceUID": str})
    folds = fold_of(labels["StudyInstanceUID"].tolist(), 3, 42)
    assert sorted(oof["StudyInstanceUID"]) == sorted(u for u, k in folds.items() if k == 0)
    assert (oof["fold"] == 0).all()
    probs = oof[list(VERTEBRAE)].to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(oof["patient_overall_noisy_or"], patient_overall(probs), rtol=1e-9)
    val_truth = labels.set_index("StudyInstanceUID").loc[oof["StudyInstanceUID"], "patient_overall"].to_numpy()
    np.testing.assert_allclose(oof["patient_overall"],
                               cross_fit_patient_overall(probs, val_truth, oof["StudyInstanceUID"].tolist()), rtol=1e-9)
    absent_uid = toy_uid(absent_study(len(labels)))
    train_labels = labels[labels["StudyInstanceUID"].map(folds) != 0]
    value = oof.loc[oof["StudyInstanceUID"] == absent_uid, VERTEBRAE[ABSENT_VERTEBRA]].item()
    assert value == pytest.approx(train_labels[VERTEBRAE[ABSENT_VERTEBRA]].mean())

    # best.pt carries the patient_overall calibration fitted on all of these validation predictions (for predict).
    expected = fit_patient_calibration(probs, val_truth)
    stored = PatientCalibration.from_dict(load_checkpoint(straight / "best.pt")["extra"]["patient_calibration"])
    assert (stored.n_studies, stored.n_positive) == (expected.n_studies, expected.n_positive) == (len(oof), int(val_truth.sum()))
    assert stored.slope == pytest.approx(expected.slope, rel=1e-4, abs=1e-6)
    assert stored.intercept == pytest.approx(expected.intercept, rel=1e-4, abs=1e-6)

    # ... and the vertebra calibration fitted on the model's own probabilities of every scored validation vertebra.
    vertebra_fit = VertebraCalibration.from_dict(load_checkpoint(straight / "best.pt")["extra"]["vertebra_calibration"])
    uncalibrated = load_classifiers([straight / "best.pt"], torch.device("cpu"))
    uncalibrated.vertebra_calibrations = [None]
    raw = np.concatenate([uncalibrated.predict(load_crops(f"{cache}/crops/{uid}.npz")) for uid in oof["StudyInstanceUID"]])
    truth = labels.set_index("StudyInstanceUID").loc[oof["StudyInstanceUID"], list(VERTEBRAE)].to_numpy().ravel()
    scored = np.isfinite(raw)
    levels = np.tile(np.arange(len(VERTEBRAE)), len(oof))
    expected_fit = fit_vertebra_calibration(raw[scored], truth[scored], levels[scored])
    assert (vertebra_fit.n_vertebrae, vertebra_fit.n_positive) == (expected_fit.n_vertebrae, expected_fit.n_positive)
    assert vertebra_fit.per_vertebra and expected_fit.per_vertebra  # the toy fold has enough of both classes
    np.testing.assert_allclose([vertebra_fit.slope, vertebra_fit.intercept, *vertebra_fit.level_slope, *vertebra_fit.level_intercept],
                               [expected_fit.slope, expected_fit.intercept, *expected_fit.level_slope, *expected_fit.level_intercept],
                               rtol=1e-3, atol=1e-3)

    # ... and the training studies' prevalence, the fallback prior of predict (no train.csv needed there).
    prevalence = load_checkpoint(straight / "best.pt")["extra"]["prevalence"]
    np.testing.assert_allclose(prevalence, train_labels[list(TARGET_COLUMNS)].mean().to_numpy(), rtol=1e-12)

    # The checkpoint alone rebuilds the model for inference; absent vertebrae come back as NaN.
    ensemble = load_classifiers([straight / "best.pt", resumed / "best.pt"], torch.device("cpu"))
    assert len(ensemble.calibrations) == 2 and ensemble.vertebra_calibrations == [vertebra_fit, vertebra_fit]
    np.testing.assert_allclose(ensemble.prevalence, prevalence, rtol=1e-12)
    crops = load_crops(f"{cache}/crops/{absent_uid}.npz")
    single = load_classifiers([straight / "best.pt"], torch.device("cpu")).predict(crops)
    both = ensemble.predict(crops, tta=True)
    assert math.isnan(both[ABSENT_VERTEBRA]) and math.isnan(single[ABSENT_VERTEBRA])
    present = np.flatnonzero(crops.present)
    assert np.isfinite(both[present]).all() and ((both[present] > 0) & (both[present] < 1)).all()
    flipped = crops.images[present][..., ::-1].copy()
    mirror = load_classifiers([straight / "best.pt"], torch.device("cpu")).predict_stacks(flipped, vertebrae=present)
    # Both checkpoints hold the same weights, so the TTA ensemble is the mean of one model's two views.
    np.testing.assert_allclose(both[present], (single[present] + mirror) / 2, rtol=1e-5)


def test_cli_train_cls_with_yaml_and_overrides(tmp_path) -> None:
    root, cache = toy_crop_dataset(tmp_path, n_studies=8)
    cfg = tiny_cls_config(tmp_path, root, cache, "cli", epochs=1)
    config_path = save_config(cfg, tmp_path / "cls.yaml")
    assert load_config(ClsConfig, config_path) == cfg
    code = cli_main(["train-cls", "--config", str(config_path), "--fold", "1", "model.head=attention",
                     "train.batch_size=4", "--no-progress"])
    assert code == 0
    run = tmp_path / "cli" / "fold1"
    saved = load_config(ClsConfig, run / "config.yaml")
    assert saved.fold == 1 and saved.model.head == "attention" and saved.train.batch_size == 4
    assert (tmp_path / "cli" / "oof_fold1.csv").is_file()
    assert len(pd.read_csv(run / "summary.csv")) == 1
    with pytest.raises(Exception, match="resume"):
        cli_main(["train-cls", "--config", str(config_path), "--fold", "1"])  # refuses to overwrite a run


def test_weight_average_resume_equals_uninterrupted(tmp_path, monkeypatch) -> None:
    root, cache = toy_crop_dataset(tmp_path)
    straight = train_classifier(tiny_cls_config(tmp_path, root, cache, "straight", ema_decay=0.9))
    cfg = tiny_cls_config(tmp_path, root, cache, "resumed", ema_decay=0.9)
    with monkeypatch.context() as patch:
        _interrupt_before_epoch(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train_classifier(cfg)
    resumed = train_classifier(cfg, resume=True)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    for key in ("model", "train_weights"):
        weights_a, weights_b = (a[key], b[key]) if key == "model" else (a["extra"][key], b["extra"][key])
        for name, tensor in weights_a.items():
            assert torch.equal(tensor, weights_b[name]), (key, name)
    # The checkpoint predicts with the average, which trails the raw weights it was built from.
    raw = a["extra"]["train_weights"]
    assert any(not torch.equal(tensor, raw[name]) for name, tensor in a["model"].items() if tensor.is_floating_point())
    assert "train_weights" not in load_checkpoint(straight / "best.pt")["extra"]
    # Validation scored the average: best.pt re-scored gives the summary's numbers for its epoch.
    summary = pd.read_csv(straight / "summary.csv")
    best = load_checkpoint(straight / "best.pt")
    oof = pd.read_csv(tmp_path / "straight" / "oof_fold0.csv", dtype={"StudyInstanceUID": str})
    labels = pd.read_csv(f"{root}/train.csv", dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    from rsna_cspine.metric import score_arrays

    truth = labels.loc[oof["StudyInstanceUID"], list(TARGET_COLUMNS)].to_numpy(float)
    at_best = summary.loc[summary["epoch"] == best["epoch"]]
    # val_score (what picks best.pt) is the OOF file's calibrated patient_overall: no study scored by a fit on its label.
    assert score_arrays(truth, oof[list(TARGET_COLUMNS)].to_numpy(float)) == pytest.approx(at_best["val_score"].item(), abs=1e-5)
    plain = np.column_stack([oof[list(VERTEBRAE)].to_numpy(float), oof["patient_overall_noisy_or"].to_numpy(float)])
    assert score_arrays(truth, plain) == pytest.approx(at_best["val_score_noisy_or"].item(), abs=1e-5)


def test_an_incomplete_or_foreign_cache_is_refused_before_joining_a_group(tmp_path, monkeypatch) -> None:
    root, cache = toy_crop_dataset(tmp_path, n_studies=6)
    cfg = tiny_cls_config(tmp_path, root, cache, "ddp", epochs=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; no process group may be joined before the check
    PreparedCache(cache).crop_path(toy_uid(2)).unlink()  # one study lost since it was prepared
    with pytest.raises(LayoutError, match=rf"1 of 6 studies neither prepared nor failed.*{toy_uid(2)}.*rsna-cspine prepare"):
        train_classifier(cfg)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(LayoutError, match="rsna-cspine prepare"):  # a plain run does not decode either
        train_classifier(cfg)
    cfg.data.crop = CropConfig(n_slices=N_SLICES, channels=CHANNELS, size=2 * SIZE)
    with pytest.raises(ConfigError, match=r"other crop settings than this config's data.crop \(size: cache 32, config 64\)"):
        train_classifier(cfg)
    assert not (tmp_path / "ddp").exists()


def test_studies_without_crops_or_excluded_are_left_out(tmp_path) -> None:
    root, cache = toy_crop_dataset(tmp_path, n_studies=6)
    prepared = PreparedCache(cache)
    ledger = prepared.ledger(settings_fingerprint(PrepareConfig(crop=CROP), [], "train"))
    ledger.save_failure(toy_uid(1), "DicomSeriesError: only 3 of 40 slice file(s) usable")  # its redo failed
    ledger.save(toy_uid(4), {"crop_file": "", "reason": "no crops: no segmentation", "outputs": []})
    cfg = tiny_cls_config(tmp_path, root, cache, "left_out", epochs=1)
    cfg.data.exclude = (toy_uid(5),)
    index = classifier_data(cfg)
    assert index["StudyInstanceUID"].tolist() == [toy_uid(k) for k in range(5)]  # the excluded study is not listed
    assert index["status"].tolist() == ["cached", "failed", "cached", "cached", "failed"]
    assert index.loc[1, "error"].startswith("DicomSeriesError") and index.loc[4, "error"] == "no crops: no segmentation"
    split = fold_split(cfg, index)
    used = set(split.train["StudyInstanceUID"]) | set(split.val_labels["StudyInstanceUID"])
    assert used == {toy_uid(k) for k in (0, 2, 3)}


def test_validation_crops_come_from_the_validation_cache(tmp_path) -> None:
    """``data.val_cache_dir`` (crops cut with stage 1's masks): the epoch, the OOF file and the stored
    calibration see those crops; training keeps the main cache's."""
    root, cache = toy_crop_dataset(tmp_path)
    cfg = tiny_cls_config(tmp_path, root, cache, "val_cache", epochs=1)
    val_uids = validation_studies(cfg)
    labels = pd.read_csv(f"{root}/train.csv", dtype={"StudyInstanceUID": str})
    folds = fold_of(labels["StudyInstanceUID"].tolist(), 3, 42)
    assert val_uids == [u for u in labels["StudyInstanceUID"] if folds[u] == 0] and len(val_uids) >= 3
    # As stage 1 might leave them: C1 missed in every validation study, and nothing found in one of them.
    val_cache = tmp_path / "val_crops"
    for k, uid in enumerate(val_uids):
        crops = load_crops(f"{cache}/crops/{uid}.npz")
        crops.present[0] = False
        if k == 0:
            crops.present[:] = False
        crops.images[~crops.present] = 0
        save_prepared(val_cache, uid, crops, mask_source="pred")
    plain = fold_split(cfg, classifier_data(cfg))
    cfg.data.val_cache_dir = str(val_cache)
    split = fold_split(cfg, classifier_data(cfg))
    pd.testing.assert_frame_equal(split.train, plain.train)
    assert split.val["path"].str.startswith(str(val_cache)).all()
    assert 0 not in set(split.val["vertebra"]) and val_uids[0] not in set(split.val["StudyInstanceUID"])
    assert len(split.val) == len(plain.val) - len(plain.val[plain.val["StudyInstanceUID"] == val_uids[0]]) - (len(val_uids) - 1)
    assert split.val_labels["StudyInstanceUID"].tolist() == val_uids  # a study with nothing found is still scored

    run = train_classifier(cfg)
    oof = pd.read_csv(tmp_path / "val_cache" / "oof_fold0.csv", dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    prior = labels[labels["StudyInstanceUID"].map(folds) != 0][list(VERTEBRAE)].mean().to_numpy()
    np.testing.assert_allclose(oof.loc[val_uids, "C1"], prior[0])  # missed by "stage 1": the prior, as predict gives it
    np.testing.assert_allclose(oof.loc[val_uids[0], list(VERTEBRAE)].to_numpy(float), prior)
    fit = VertebraCalibration.from_dict(load_checkpoint(run / "best.pt")["extra"]["vertebra_calibration"])
    assert fit.n_vertebrae == len(split.val)

    # The validation cache must hold every validation study; the error says how to prepare it.
    (val_cache / "crops" / f"{val_uids[1]}.npz").unlink()
    with pytest.raises(LayoutError, match=r"1 of \d+ studies neither prepared nor failed.*--seg-models"):
        fold_split(cfg, classifier_data(cfg))


def test_the_monitored_score_picks_best_pt(tmp_path) -> None:
    """``train.monitor``: the epoch kept is the best under the rule the models will predict with."""
    root, cache = toy_crop_dataset(tmp_path)
    cfg = tiny_cls_config(tmp_path, root, cache, "noisy_or", epochs=3, monitor="val_score_noisy_or")
    run = train_classifier(cfg)
    summary = pd.read_csv(run / "summary.csv")
    best = load_checkpoint(run / "best.pt")
    assert best["best_score"] == pytest.approx(summary["val_score_noisy_or"].min(), abs=1e-5)
    assert best["epoch"] == summary.loc[summary["val_score_noisy_or"].idxmin(), "epoch"]
    assert not np.isclose(summary["val_score"].min(), summary["val_score_noisy_or"].min())  # the two would differ
    cfg.train.monitor = "val_auc"
    with pytest.raises(ConfigError, match="train.monitor must be one of"):
        train_classifier(cfg)
