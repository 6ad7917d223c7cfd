"""Pictures that show why the pipeline scored a study as it did: overlays, crop montages and Grad-CAM.

For every vertebra C1..C7 of one study, :class:`StudyExplainer` writes three PNGs into the output folder:

* ``<V>_views.png``: the mid-sagittal plane through the vertebra and the axial slice through its middle,
  with the stage-1 segmentation laid over them (the vertebra outlined, its crop box drawn);
* ``<V>_crops.png``: the 2.5D stack the classifier saw (centre channel of every slice);
* ``<V>_gradcam.png``: the same stack with the classifier's Grad-CAM on top;

each titled with the vertebra's fracture probability, plus ``overview.png`` (mid-sagittal plane of the
whole cervical spine, every vertebra labelled with its probability) and ``probabilities.csv``. A
vertebra stage 1's quality check dropped (``seg.qc``) is drawn where the network had put it, with the
reason it took the prior; ``probabilities.csv`` holds every verdict (``qc``). A picture that cannot be
drawn does not fail the study (its numbers are already computed): the explanation lists it under
``missing`` with the reason.

The pictures themselves are drawn by :mod:`rsna_cspine.report.pictures`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.crops.extract import CropConfig, to_unit_float
from rsna_cspine.inference import FracturePipeline, PipelineConfig, StudyIntermediates, StudyPrediction
from rsna_cspine.report.gradcam import StackGradCAM
from rsna_cspine.report.pictures import (
    centre_channel,
    probability_text,
    render_montage,
    render_overview,
    render_views,
)

logger = logging.getLogger(__name__)

#: ``progress(message, fraction)``: what the work is doing now and how much of it is done (0..1).
Progress = Callable[[str, float], None]


@dataclass
class VertebraExplanation:
    """The pictures of one vertebra.

    Attributes:
        vertebra: ``C1``..``C7``.
        probability: the probability the pipeline reports for it (the prior when it was not found).
        found: stage 1 found the vertebra and its quality check kept it (else only ``views`` is drawn,
            without it).
        pictures: picture kind (``views``, ``crops``, ``gradcam``) → PNG path.
        missing: picture kind → why it was not drawn.
        qc: stage 1's quality-check verdict: ``ok``, ``absent`` or ``dropped: <reason>``.
    """

    vertebra: str
    probability: float
    found: bool
    pictures: dict[str, Path] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    qc: str = ""


@dataclass
class StudyExplanation:
    """Everything ``explain`` wrote for one study.

    Attributes:
        uid: the study (its folder name).
        probabilities: ``TARGET_COLUMNS`` → probability, as ``FracturePipeline.predict_study`` reports them.
        prediction: the pipeline's own result for the study.
        vertebrae: one entry per vertebra, C1..C7.
        overview: mid-sagittal picture of the whole cervical spine (None when it could not be drawn).
        table: ``probabilities.csv``.
        out_dir: the folder holding every file.
        missing: ``overview`` → why it was not drawn, when it was not.
    """

    uid: str
    probabilities: dict[str, float]
    prediction: StudyPrediction
    vertebrae: list[VertebraExplanation]
    overview: Path | None
    table: Path
    out_dir: Path
    missing: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# One study
# ----------------------------------------------------------------------------------------------


#: Progress reported when each stage of the prediction starts (the pictures take the rest).
_STAGE_PROGRESS = {"load": 0.05, "segment": 0.15, "crop": 0.4, "classify": 0.5}


class StudyExplainer:
    """Pictures for studies, with the models of one loaded :class:`FracturePipeline`.

    Args:
        pipeline: the loaded models (the probabilities shown are its ``predict_study`` output).
        window: HU display window of the overlays; default the classifier's first crop window.
    """

    def __init__(self, pipeline: FracturePipeline, window: tuple[float, float] | None = None) -> None:
        self.pipeline = pipeline
        self.crop_config: CropConfig = pipeline.crop_config
        self.window = tuple(window or self.crop_config.windows[0])
        self.gradcam = StackGradCAM(pipeline.classifiers("full").models)

    def _predict(self, folder: Path, progress: Progress) -> tuple[StudyPrediction, StudyIntermediates]:
        """The pipeline's own prediction, with the volume, mask and crops it made on the way.

        One pass through ``predict_study``: the pictures show exactly what `rsna-cspine predict` computed.
        """
        prediction = self.pipeline.predict_study(
            folder, keep_intermediates=True,
            on_stage=lambda stage: progress(f"predicting: {stage}", _STAGE_PROGRESS[stage]),
        )
        parts = prediction.intermediates
        assert parts is not None
        prediction.intermediates = None  # the result outlives the pictures (the web page keeps it): not the volume
        return prediction, parts

    def explain(
        self,
        folder: str | Path,
        out_dir: str | Path,
        vertebrae: Sequence[str] = VERTEBRAE,
        progress: Progress | None = None,
    ) -> StudyExplanation:
        """Predict one study and write its pictures.

        Args:
            folder: the study: a folder of DICOM files, an Enhanced CT file or a NIfTI file.
            out_dir: where the PNGs and ``probabilities.csv`` go (created).
            vertebrae: which vertebrae get pictures (all seven by default).
            progress: called with a message and the fraction done, for progress bars and the web page.

        Raises:
            StudyFailure: the pipeline could not predict the study (the stage and cause are named).
        """
        folder, out_dir = Path(folder), Path(out_dir)
        unknown = sorted(set(vertebrae) - set(VERTEBRAE))
        if unknown:
            raise ValueError(f"unknown vertebrae {unknown}; choose among {VERTEBRAE}")
        report = progress or (lambda message, fraction: None)
        out_dir.mkdir(parents=True, exist_ok=True)
        prediction, parts = self._predict(folder, report)
        mask = parts.segmentation.mask
        probs = prediction.probs
        probabilities = {column: float(probs[j]) for j, column in enumerate(TARGET_COLUMNS)}
        stage1 = parts.segmentation.vertebrae
        verdicts = [str(v) for v in stage1["qc"]] if "qc" in stage1 else [""] * len(VERTEBRAE)
        table = out_dir / "probabilities.csv"
        pd.DataFrame(
            {"target": list(TARGET_COLUMNS), "probability": probs,
             "found": [bool(f) for f in parts.crops.present] + [True], "qc": verdicts + [parts.segmentation.qc]}
        ).to_csv(table, index=False)
        report("drawing the overview", 0.6)
        missing: dict[str, str] = {}
        overview = draw_or_note(
            partial(render_overview, parts.volume, mask, parts.crops, probs, out_dir / "overview.png", self.window,
                    vertebrae=stage1),
            f"study {prediction.uid}", "overview", missing,
        )

        explained: list[VertebraExplanation] = []
        chosen = [i for i, v in enumerate(VERTEBRAE) if v in vertebrae]
        channel = centre_channel(self.crop_config)
        for k, i in enumerate(tqdm(chosen, desc="explain", unit="vertebra", disable=None, leave=False)):
            vertebra = VERTEBRAE[i]
            report(f"pictures of {vertebra}", 0.6 + 0.4 * k / max(len(chosen), 1))
            found = bool(parts.crops.present[i])
            item = VertebraExplanation(vertebra, float(probs[i]), found, qc=verdicts[i])
            title = probability_text(vertebra, float(probs[i]), found, verdicts[i])
            what = f"study {prediction.uid}, {vertebra}"
            views = partial(render_views, parts.volume, mask, parts.crops, i, float(probs[i]),
                            out_dir / f"{vertebra}_views.png", self.window, verdict=verdicts[i])
            draw_or_note(views, what, "views", item.missing, item.pictures)
            if found:
                stack, where = parts.crops.images[i], parts.crops.slice_index[i]
                crops = partial(render_montage, stack, where, f"{title} - 2.5D crops", out_dir / f"{vertebra}_crops.png", channel)
                draw_or_note(crops, what, "crops", item.missing, item.pictures)
                cam = partial(self._gradcam_picture, stack, where, title, out_dir / f"{vertebra}_gradcam.png", channel)
                draw_or_note(cam, what, "gradcam", item.missing, item.pictures)
            else:
                why = verdicts[i] if verdicts[i].startswith("dropped") else f"stage 1 did not find {vertebra}"
                item.missing["crops"] = item.missing["gradcam"] = f"{why}: no crops to show"
            explained.append(item)
        report("done", 1.0)
        drawn = (overview is not None) + sum(len(v.pictures) for v in explained)
        logger.info("study %s: %d pictures in %s", prediction.uid, drawn, out_dir)
        return StudyExplanation(
            uid=prediction.uid,
            probabilities=probabilities,
            prediction=prediction,
            vertebrae=explained,
            overview=overview,
            table=table,
            out_dir=out_dir,
            missing=missing,
        )

    def _gradcam_picture(self, stack: np.ndarray, where: np.ndarray, title: str, out_path: Path, channel: int) -> Path:
        """The stack with the classifiers' Grad-CAM on top."""
        cam = self.gradcam(to_unit_float(stack))
        # An all-zero map is an answer too (nothing raised the logit); say so rather than show a blank.
        note = " - Grad-CAM" if cam.peak > 0 else " - Grad-CAM (empty: nothing raised the logit)"
        return render_montage(stack, where, title + note, out_path, channel, cam=cam.cam)


def draw_or_note(
    render: Callable[[], Path], what: str, kind: str, missing: dict[str, str], pictures: dict[str, Path] | None = None
) -> Path | None:
    """Draw one picture; one that cannot be drawn is recorded in ``missing`` with the reason instead.

    The prediction has succeeded by then: its numbers stand, and the page says which picture is missing and why.

    Args:
        render: draws the picture and returns its path.
        what: the study (and vertebra), for the log.
        kind: the picture's kind (the key in ``pictures`` / ``missing``).
        missing: kind → reason, filled on failure.
        pictures: kind → path, filled on success.
    """
    try:
        path = render()
    except Exception as exc:  # noqa: BLE001 - any drawing failure leaves the other pictures and the numbers intact
        logger.warning("%s: %s picture not drawn (%s: %s)", what, kind, exc.__class__.__name__, exc)
        missing[kind] = f"drawing failed ({exc.__class__.__name__}: {exc})"
        return None
    if pictures is not None:
        pictures[kind] = path
    return path


def explain_study(
    study_dir: str | Path,
    models_dir: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    vertebrae: Sequence[str] = VERTEBRAE,
) -> StudyExplanation:
    """Load the models of a models folder and write the pictures of one study.

    Args:
        study_dir: the study: a folder of DICOM files, an Enhanced CT file or a NIfTI file.
        models_dir: folder with ``seg/`` and ``cls/`` checkpoints (as for ``rsna-cspine predict``).
        out_dir: where the pictures go.
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
        vertebrae: which vertebrae get pictures.
    """
    pipeline = FracturePipeline.from_models_dir(models_dir, PipelineConfig(device=device))
    return StudyExplainer(pipeline).explain(study_dir, out_dir, vertebrae=vertebrae)
