"""``rsna-cspine demo`` end to end, with settings small enough for the test suite (about 1–2 minutes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from rsna_cspine.cli import main
from rsna_cspine.demo import DemoConfig, predict_reserve, run_demo
from rsna_cspine.errors import ConfigError
from rsna_cspine.io.kaggle import read_test_csv
from rsna_cspine.metric import competition_score, labels_to_solution
from rsna_cspine.report.demo_summary import slow_machine_advice
from tests.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from demo_crosscheck import FRACTURE_KNOBS, MOVED_KNOBS, defaults_config  # noqa: E402
from demo_crosscheck import main as crosscheck_main  # noqa: E402
from stage2_sets import cut_crops, score_sets  # noqa: E402

torch.set_num_threads(1)

#: The shipped stage configs, shrunk: a 32³ UNet, 4-slice 32 px crops, one epoch each.
TINY = {
    "minutes": 2.0,
    "device": "cpu",
    "synth": {"n_studies": 10, "image_size": 64, "test_fraction": 0.3, "n_slices": [40, 56], "prevalence_scale": 2.0},
    "seg_overrides": ["data.grid=[32,32,32]", "model.channels=[4,8,16]", "model.strides=[2,2]", "train.patch_size=[0,0,0]",
                      "train.epochs=1", "train.n_folds=3"],
    "cls_overrides": ["train.epochs=1", "train.n_folds=3", "data.crop.n_slices=4", "data.crop.size=32",
                      "model.backbone=test_resnet", "model.hidden=8"],
    "reserve_s": 10.0,
    "workers": 2,
    # Every fractured vertebra counts as detected, so the tiny models always have a detection to draw.
    "threshold": 0.0,
}


def test_demo_writes_a_valid_scored_submission_report_and_pictures(tmp_path: Path, capsys, monkeypatch) -> None:
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--config", str(config_file), "--seed", "3"]) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / "demo_summary.json").read_text())
    for key in ("submission", "timings", "cv_report", "models_dir"):
        assert Path(summary[key]).exists() and summary[key] in printed
    assert summary["pictures"] and all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in summary["pictures"])
    assert {"roc.png", "reliability.png", "confusion.png", "curves.png"} <= {Path(p).name for p in summary["pictures"]}
    assert (out / "models" / "seg" / "fold0" / "best.pt").is_file() and (out / "models" / "cls" / "fold0" / "best.pt").is_file()

    # The submission covers test.csv exactly, and its score is the metric on the held-out labels.
    test = read_test_csv(out / "data" / "test.csv")
    submission = pd.read_csv(out / "submission.csv", dtype={"row_id": str})
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    assert np.isfinite(submission["fractured"]).all() and submission["fractured"].between(0, 1).all()
    solution = labels_to_solution(pd.read_csv(out / "data" / "test_labels.csv", dtype={"StudyInstanceUID": str}))
    assert summary["score"] == pytest.approx(competition_score(solution, submission))
    assert np.isfinite(summary["prior_score"]) and summary["n_test"] == 3
    assert f"model {summary['score']:.4f} vs prior {summary['prior_score']:.4f}" in printed
    assert summary["score"] == pytest.approx(summary["heldout"]["score"])
    assert (out / "cv_report" / "report.md").is_file()

    # The held-out figures: AUC over every test vertebra from the submission itself, the threshold's counts,
    # and the picture of a detected fracture (every vertebra is "detected" at threshold 0: none is cleared).
    held = summary["heldout"]
    parts = submission["row_id"].str.extract(r"^(?P<uid>.+)_(?P<col>C[1-7])$")
    vert = pd.concat([submission, parts], axis=1).dropna(subset=["col"])
    truth = pd.read_csv(out / "data" / "test_labels.csv", dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    y = np.array([truth.at[u, c] for u, c in zip(vert["uid"], vert["col"])])
    assert held["n_vertebrae"] == 7 * 3 and held["n_fractured"] == int(y.sum()) > 0
    if 0 < y.sum() < len(y):
        assert held["auc"] == pytest.approx(roc_auc_score(y, vert["fractured"]))
    assert (held["sensitivity"], held["specificity"]) == (1.0, 0.0)
    for line in (f"per-vertebra ROC AUC:  {held['auc']:.3f}", "sensitivity at p >= 0: 1.000", "specificity at p >= 0: 0.000",
                 f"{abs(held['below_prior']):.1%} {'below' if held['below_prior'] >= 0 else 'above'} the prior"):
        assert line in printed
    if summary["detection_picture"] is None:
        # The tiny stage 1 and its anatomical QC can leave no test vertebra with crops (nothing to draw
        # Grad-CAM on): the summary says the picture is missing rather than naming a file.
        assert "(Grad-CAM): not drawn" in printed
    else:
        picture = Path(summary["detection_picture"])
        assert picture.read_bytes()[:4] == b"\x89PNG" and str(picture) in printed
        assert list((out / "detection").glob("detected_*/C?_gradcam.png"))
    assert yaml.safe_load((out / "demo_config.yaml").read_text())["seed"] == 3
    # Stage 2 trained its one configured epoch: the budget did not cut it short, so no slow-machine note.
    assert summary["stage2_epochs"] == 1 and summary["advice"] == "" and "NOTE" not in printed

    # Stage 2 picked its epoch and fitted its calibration on its validation studies cropped with the masks of the
    # stage 1 just trained, which never trained on them: as the test studies are cropped.
    cls_config = yaml.safe_load((out / "runs" / "cls" / "fold0" / "config.yaml").read_text())
    manifest = pd.read_csv(Path(cls_config["data"]["val_cache_dir"]) / "manifest.csv", dtype={"StudyInstanceUID": str})
    oof = pd.read_csv(out / "runs" / "cls" / "oof_fold0.csv", dtype={"StudyInstanceUID": str})
    assert sorted(manifest["StudyInstanceUID"]) == sorted(oof["StudyInstanceUID"]) and len(oof) > 0
    assert set(manifest["mask_source"]) == {"pred"}
    seg_config = yaml.safe_load((out / "runs" / "seg" / "fold0" / "config.yaml").read_text())
    assert set(oof["StudyInstanceUID"]) <= set(seg_config["data"]["exclude"])

    # The cross-check script runs on this demo: fresh studies, moved knobs, the demo's models. It finds them in the
    # demo folder, not at the summary's path, which is relative to wherever the demo ran (`--out demo`).
    summary_file = out / "demo_summary.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "models_dir": "demo/models"}))
    xcheck = tmp_path / "xcheck"
    assert not (out / "data" / "demo").exists()
    with monkeypatch.context() as elsewhere:
        elsewhere.chdir(out / "data")  # where "demo/models" holds nothing
        assert crosscheck_main(["--demo", str(out), "--work", str(xcheck), "--quick", "--unmoved", "--device", "cpu"]) == 0
    report = json.loads((xcheck / "crosscheck.json").read_text())
    (seed, result), (paired, unmoved) = report["results"].items()
    assert result["n_studies"] == 4 and np.isfinite(result["score"]) and result["knobs"]["noise_hu"] != [10.0, 40.0]
    timings = pd.read_csv(xcheck / f"seed{seed}" / "submission.timings.csv")
    assert set(timings["path"]) == {"full"} and set(timings["status"]) == {"ok"}  # every study through the models
    # --unmoved: the same studies and labels at the demo's own knobs, not counted in the targets.
    assert paired == f"{seed}_unmoved" and list(report["met"]) == [seed]
    assert unmoved["knobs"]["noise_hu"] == [10.0, 40.0] and unmoved["n_fractured"] == result["n_fractured"]
    demo_knobs = yaml.safe_load((out / "data" / "synth_config.yaml").read_text())
    assert {k: unmoved["knobs"][k] for k in MOVED_KNOBS} == {k: demo_knobs[k] for k in MOVED_KNOBS}
    assert summary["seconds"]["total"] >= summary["seconds"]["data"] > 0  # the stage clock is kept (the demo's
    # ten-minute target is a benchmark: README, "Measured figures", `time rsna-cspine demo`)

    # benchmarks/stage2_sets.py: the demo's stage-1 crops stored once, then the demo's stage 2 scored on them,
    # gives the vertebrae the demo's own pipeline gave; a refitted calibration runs on the same model.
    cut_crops(out, [out / "data"], tmp_path / "s2")
    stored = score_sets(out, [tmp_path / "s2"], out / "runs" / "cls", tta=False)["demo"]
    if 0 < y.sum() < len(y):
        assert stored["auc"] == pytest.approx(held["auc"], abs=1e-4)
    (cache,) = (out / "work").glob("prepared_*")
    refitted = score_sets(out, [tmp_path / "s2"], out / "runs" / "cls", tta=False, calibration="pooled", cache=cache)["demo"]
    assert np.isfinite(refitted["below_prior"])

    # A second run in the same folder reuses the data (not one file rewritten) and replaces the runs.
    data_files = {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*") if p.is_file()}
    result = run_demo(out, config=DemoConfig(**{**TINY, "seed": 3}))
    assert "reusing the synthetic dataset" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*") if p.is_file()} == data_files
    assert result.score == pytest.approx(competition_score(solution, pd.read_csv(out / "submission.csv",
                                                                                  dtype={"row_id": str})))


def test_the_crosscheck_set_at_generator_defaults_undoes_exactly_the_demos_fracture_knobs() -> None:
    from rsna_cspine.config import load_config
    from rsna_cspine.synth import SynthConfig

    demo = load_config(SynthConfig, values=load_config(DemoConfig, REPO_ROOT / "configs" / "demo.yaml").synth).to_dict()
    generator = SynthConfig().to_dict()
    assert any(demo[k] != generator[k] for k in FRACTURE_KNOBS)  # the shipped demo does make fractures easier
    values = defaults_config(demo, seed=7, studies=5)
    assert {k: values[k] for k in FRACTURE_KNOBS} == {k: generator[k] for k in FRACTURE_KNOBS}
    others = set(demo) - set(FRACTURE_KNOBS) - {"seed", "n_studies", "test_fraction", "fov_slab_fraction"}
    assert {k: values[k] for k in others} == {k: demo[k] for k in others}
    assert SynthConfig(**{**values, "n_studies": 5}).test_fraction == 1.0


def test_the_demos_fractures_are_the_generators_conspicuous_preset() -> None:
    """configs/demo.yaml writes its fracture knobs out (a user reads them there); they must stay those of
    ``CONSPICUOUS_FRACTURES``, which synth-sagittal and the evidence runs share."""
    from rsna_cspine.config import load_config
    from rsna_cspine.synth import SynthConfig
    from rsna_cspine.synth.config import CONSPICUOUS_FRACTURES
    from rsna_cspine.twod.sagittal import conspicuous_fractures

    demo = load_config(SynthConfig, values=load_config(DemoConfig, REPO_ROOT / "configs" / "demo.yaml").synth)
    preset = SynthConfig(**CONSPICUOUS_FRACTURES)
    assert {k: getattr(demo, k) for k in CONSPICUOUS_FRACTURES} == {k: getattr(preset, k) for k in CONSPICUOUS_FRACTURES}
    assert {k: getattr(conspicuous_fractures(), k) for k in CONSPICUOUS_FRACTURES} == \
        {k: getattr(preset, k) for k in CONSPICUOUS_FRACTURES}
    assert any(getattr(preset, k) != getattr(SynthConfig(), k) for k in CONSPICUOUS_FRACTURES)


def test_the_crosscheck_stops_when_the_demos_models_do_not_load(tmp_path: Path) -> None:
    # predict would give every study the prior and the sets would score it as if it were the demo's models.
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    (demo / "data" / "synth_config.yaml").write_text("{}\n")
    (demo / "models" / "seg").mkdir(parents=True)
    with pytest.raises(SystemExit, match="models do not load"):
        crosscheck_main(["--demo", str(demo), "--work", str(tmp_path / "xcheck"), "--quick", "--device", "cpu"])
    assert not (tmp_path / "xcheck").exists()


def test_a_stage_2_cut_short_by_the_budget_gets_the_minutes_that_would_give_it_its_epochs() -> None:
    # 2 epochs of 23 s where 10 were wanted: 184 s more for stage 2, which gets 55 % of any extra minute; a fifth on top.
    advice = slow_machine_advice(epochs=2, epoch_s=23.0, minutes=9.3, seg_share=0.45, min_epochs=10)
    assert "2 epoch(s) of 23 s" in advice and advice.endswith("rsna-cspine demo --minutes 16")  # 9.3 + 1.2 x 5.6 min
    assert slow_machine_advice(epochs=9, epoch_s=12.0, minutes=9.3, seg_share=0.45, min_epochs=10).endswith("--minutes 10")
    assert slow_machine_advice(epochs=10, epoch_s=23.0, minutes=9.3, seg_share=0.45, min_epochs=10) == ""
    assert slow_machine_advice(epochs=0, epoch_s=float("nan"), minutes=9.3, seg_share=0.45, min_epochs=10) == ""


def test_predict_keeps_the_time_step_4_took_per_study_when_that_is_more_than_the_reserve() -> None:
    assert predict_reserve(45.0, val_crops_s=88.0, n_val=44, n_test=36) == pytest.approx(88.0 / 44 * 36 + 10.0)
    assert predict_reserve(45.0, val_crops_s=30.0, n_val=44, n_test=36) == 45.0  # a fast machine keeps the reserve
    assert predict_reserve(45.0, val_crops_s=0.0, n_val=0, n_test=36) == 45.0  # no validation studies: no pace


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a previous demo"):
        run_demo(tmp_path, config=DemoConfig(**TINY))
    assert (tmp_path / "precious.txt").read_text() == "keep me"
