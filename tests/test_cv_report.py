"""The CV report: numbers agree with sklearn, the model beats the prior, files and plots are valid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, log_loss, precision_score, recall_score, roc_auc_score

from rsna_cspine.calibration import cross_fit_patient_overall
from rsna_cspine.cli import main
from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import LayoutError
from rsna_cspine.report.cv import cv_report, load_oof

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_STUDIES = 240


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random labels (with 20 labelled studies left without predictions) and informative noisy OOF."""
    rng = np.random.default_rng(11)
    prevalence = np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.19])
    vertebrae = (rng.random((N_STUDIES, 7)) < prevalence).astype(int)
    uids = [f"1.2.826.0.1.3680043.{1000 + i}" for i in range(N_STUDIES)]
    labels = pd.DataFrame(vertebrae, columns=list(VERTEBRAE))
    labels.insert(0, "patient_overall", vertebrae.max(axis=1))
    labels.insert(0, "StudyInstanceUID", uids)
    logit = np.log(prevalence / (1 - prevalence)) + 3.0 * vertebrae + rng.normal(0, 1.0, vertebrae.shape)
    oof = pd.DataFrame(1 / (1 + np.exp(-logit)), columns=list(VERTEBRAE))
    oof.insert(0, "StudyInstanceUID", uids)
    return labels, oof.iloc[: N_STUDIES - 20].reset_index(drop=True)


@pytest.fixture(scope="module")
def report(data, tmp_path_factory) -> tuple[Path, int]:
    """Run the real ``rsna-cspine cv`` command on two fold files."""
    labels, oof = data
    root = tmp_path_factory.mktemp("cv")
    labels.to_csv(root / "train.csv", index=False)
    (root / "oof").mkdir()
    half = len(oof) // 2
    oof.iloc[:half].to_csv(root / "oof" / "oof_fold0.csv", index=False)
    oof.iloc[half:].to_csv(root / "oof" / "oof_fold1.csv", index=False)
    code = main(["cv", "--oof", str(root / "oof"), "--labels", str(root / "train.csv"), "--out", str(root / "out")])
    return root / "out", code


def _arrays(data, rule: str = "calibrated") -> tuple[np.ndarray, np.ndarray]:
    """Truth and predictions as the report must score them: patient_overall by the default rule, ``calibrated``
    (cross-fitted inside each of the two fold files), or plain noisy-OR recomputed here."""
    labels, oof = data
    y = labels.set_index("StudyInstanceUID").loc[oof.StudyInstanceUID, list(TARGET_COLUMNS)].to_numpy()
    p = oof[list(VERTEBRAE)].to_numpy()
    if rule == "noisy_or":
        return y, np.column_stack([p, 1 - np.prod(1 - p, axis=1)])
    half, uids = len(oof) // 2, oof.StudyInstanceUID.tolist()
    overall = np.concatenate([cross_fit_patient_overall(p[:half], y[:half, 7], uids[:half]),
                              cross_fit_patient_overall(p[half:], y[half:, 7], uids[half:])])
    return y, np.column_stack([p, overall])


def test_files_exist_and_plots_are_png(report) -> None:
    out, code = report
    assert code == 0
    for name in ("scores.csv", "folds.csv", "per_column.csv", "confusion_matrices.csv", "calibration.csv", "report.md"):
        assert (out / name).stat().st_size > 0, name
    for name in ("roc.png", "reliability.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.05  # something was drawn


def test_scores_agree_with_sklearn_and_beat_prior(report, data) -> None:
    out, _ = report
    y, p = _arrays(data)
    w = np.where(y == 1, [2] * 7 + [14], [1] * 7 + [7])
    prior = np.tile(y.mean(axis=0), (len(y), 1))
    scores = pd.read_csv(out / "scores.csv").set_index("form")

    def by_form(pred: np.ndarray) -> dict[str, float]:
        per_study = [log_loss(y[i], pred[i], sample_weight=w[i], labels=[0, 1]) for i in range(len(y))]
        per_column = [log_loss(y[:, j], pred[:, j], sample_weight=w[:, j]) for j in range(8)]
        return {
            "study": float(np.mean(per_study)),
            "global": log_loss(y.ravel(), pred.ravel(), sample_weight=w.ravel()),
            "column": (sum(per_column[:7]) + 7 * per_column[7]) / 14,
        }

    model, baseline = by_form(p), by_form(prior)
    for form in ("study", "global", "column"):
        assert scores.loc[form, "model"] == pytest.approx(model[form], rel=1e-8)
        assert scores.loc[form, "prior"] == pytest.approx(baseline[form], rel=1e-9)
        assert scores.loc[form, "model"] < 0.8 * scores.loc[form, "prior"]
        assert scores.loc[form, "relative_improvement"] == pytest.approx(1 - model[form] / baseline[form])
    folds = pd.read_csv(out / "folds.csv")
    assert folds.fold.tolist() == [0, 1] and folds.n.sum() == len(y)


def test_per_column_and_confusion_agree_with_sklearn(report, data) -> None:
    out, _ = report
    y, p = _arrays(data)
    per_column = pd.read_csv(out / "per_column.csv").set_index("column")
    confusion = pd.read_csv(out / "confusion_matrices.csv").set_index("column")
    assert list(per_column.index) == list(TARGET_COLUMNS) + ["vertebrae_pooled"]
    pooled = (y[:, :7].ravel(), p[:, :7].ravel())
    cases = [(c, (y[:, j], p[:, j])) for j, c in enumerate(TARGET_COLUMNS)] + [("vertebrae_pooled", pooled)]
    for name, (truth, prob) in cases:
        row = per_column.loc[name]
        weight = np.where(truth == 1, 14 if name == "patient_overall" else 2, 7 if name == "patient_overall" else 1)
        predicted = (prob >= 0.5).astype(int)
        assert row.weighted_log_loss == pytest.approx(log_loss(truth, prob, sample_weight=weight))
        assert row.roc_auc == pytest.approx(roc_auc_score(truth, prob))
        assert row.sensitivity == pytest.approx(recall_score(truth, predicted))
        assert row.specificity == pytest.approx(recall_score(truth, predicted, pos_label=0))
        assert row.ppv == pytest.approx(precision_score(truth, predicted))
        assert row.prevalence == pytest.approx(truth.mean())
        assert row.n == len(truth)
        tn, fp, fn, tp = confusion_matrix(truth, predicted).ravel()
        assert confusion.loc[name, ["tn", "fp", "fn", "tp"]].tolist() == [tn, fp, fn, tp]
    assert per_column.loc["patient_overall", "roc_auc"] > 0.8


def test_the_calibrated_and_noisy_or_rules_are_scored_side_by_side(report, data, tmp_path: Path) -> None:
    out, _ = report
    rules = pd.read_csv(out / "rules.csv").set_index("patient_overall")
    assert list(rules.index) == ["calibrated", "noisy_or"]  # the files have no patient_overall of their own
    scores = pd.read_csv(out / "scores.csv").set_index("form")
    assert rules.loc["calibrated", "score_study"] == pytest.approx(scores.loc["study", "model"], rel=1e-12)
    y, p = _arrays(data, "noisy_or")
    w = np.where(y == 1, [2] * 7 + [14], [1] * 7 + [7])
    plain = np.mean([log_loss(y[i], p[i], sample_weight=w[i], labels=[0, 1]) for i in range(len(y))])
    assert rules.loc["noisy_or", "score_study"] == pytest.approx(plain, rel=1e-9)
    assert rules.loc["noisy_or", "patient_roc_auc"] == pytest.approx(roc_auc_score(y[:, 7], p[:, 7]))
    assert "## patient_overall rules side by side" in (out / "report.md").read_text()
    labels, oof = data
    by_noisy_or = cv_report(oof, labels, tmp_path, rule="noisy_or")
    assert by_noisy_or["scores"]["study"]["model"] == pytest.approx(plain, rel=1e-9)
    given = cv_report(oof.assign(patient_overall=0.3), labels, tmp_path / "given")
    assert list(given["rules"]) == ["as in the OOF files", "calibrated", "noisy_or"]


def test_calibration_matches_sklearn(report, data) -> None:
    out, _ = report
    y, p = _arrays(data)
    calibration = pd.read_csv(out / "calibration.csv")
    for j, name in [(7, "patient_overall"), (1, "C2")]:
        table = calibration[calibration.column == name]
        assert len(table) == 10 and table["count"].sum() == len(y)
        observed, mean_predicted = calibration_curve(y[:, j], p[:, j], n_bins=10)
        filled = table[table["count"] > 0]
        np.testing.assert_allclose(filled.observed_rate, observed)
        np.testing.assert_allclose(filled.mean_predicted, mean_predicted)
    pooled = calibration[calibration.column == "vertebrae_pooled"]
    assert pooled["count"].sum() == 7 * len(y)


def test_report_markdown_has_every_section(report) -> None:
    out, _ = report
    text = (out / "report.md").read_text()
    scores = pd.read_csv(out / "scores.csv").set_index("form")
    assert f"{scores.loc['study', 'model']:.4f}" in text
    assert "220 studies with out-of-fold predictions (of 240 labelled)" in text
    for piece in ("## Per column", "## Confusion matrices", "roc.png", "reliability.png", "confusion.png", "| C7"):
        assert piece in text


def test_given_patient_overall_is_used_and_rule_applies(data, tmp_path: Path) -> None:
    labels, oof = data
    y, _ = _arrays(data)
    with_overall = oof.assign(patient_overall=0.5)
    summary = cv_report(with_overall, labels, tmp_path / "a")
    assert summary["per_column"]["patient_overall"]["mean_predicted"] == pytest.approx(0.5)
    by_max = cv_report(oof, labels, tmp_path / "b", rule="max")
    expected_mean = oof[list(VERTEBRAE)].max(axis=1).mean()
    assert by_max["per_column"]["patient_overall"]["mean_predicted"] == pytest.approx(expected_mean)
    assert by_max["n_studies"] == len(y)


def test_refuses_unknown_or_duplicated_studies(data, tmp_path: Path) -> None:
    labels, oof = data
    duplicated = pd.concat([oof, oof.iloc[[3]]])
    with pytest.raises(LayoutError, match=rf"duplicated studies.*{oof.StudyInstanceUID[3]}"):
        cv_report(duplicated, labels, tmp_path)
    unknown = oof.copy()
    unknown.loc[0, "StudyInstanceUID"] = "9.9.9"
    with pytest.raises(LayoutError, match=r"absent from the labels.*9\.9\.9"):
        cv_report(unknown, labels, tmp_path)
    with pytest.raises(LayoutError, match=r"lack columns \['C4'\]"):
        cv_report(oof.drop(columns="C4"), labels, tmp_path)
    with pytest.raises(LayoutError, match="no oof"):
        load_oof(tmp_path)
    assert not (tmp_path / "scores.csv").exists()


def test_cli_reports_bad_input_with_exit_code(data, tmp_path: Path) -> None:
    labels, oof = data
    labels.to_csv(tmp_path / "train.csv", index=False)
    pd.concat([oof, oof.iloc[[0]]]).to_csv(tmp_path / "oof.csv", index=False)
    code = main(["cv", "--oof", str(tmp_path / "oof.csv"), "--labels", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "out")])
    assert code == 1
