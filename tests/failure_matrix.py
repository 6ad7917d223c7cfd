"""The failure matrix: every bad input, what the program does with it, and the tests that prove it.

This list is the single source of ``docs/failure_matrix.md``::

    python -m tests.failure_matrix --write   # regenerate the document
    python -m tests.failure_matrix --check   # exit 1 when the document is stale

tests/test_reliability_inputs.py fails when the document differs from :func:`render`, when a test
named here no longer exists, or when a row's status (proven / known bug) disagrees with its tests'
``xfail`` markers.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.paths import REPO_ROOT as ROOT

DOC_PATH = ROOT / "docs" / "failure_matrix.md"


@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    Attributes:
        area: the table the row belongs to.
        bad_input: the input, as a user would describe it.
        behaviour: what the program does (for a known bug: what it must do, which its tests assert).
        tests: node ids of the test functions that prove it (``tests/<file>.py::<test>``, no parameter ids:
            every parametrization of a named function is part of the proof).
        bug: for a known bug, what happens today; its tests are ``xfail(strict=True)`` until it is fixed.
    """

    area: str
    bad_input: str
    behaviour: str
    tests: tuple[str, ...]
    bug: str = ""


SERIES = "DICOM series (`rsna_cspine.io.dicom.load_series`)"
FUZZ = "Mutated real DICOM files (fuzzing)"
NIFTI = "Segmentation NIfTI (`rsna_cspine.io.nifti.load_segmentation`)"
CSV = "Competition CSV tables"
RUN = "Prediction and training runs"
VIEWER = "Study viewer (`rsna-cspine serve`)"
AREAS: tuple[str, ...] = (SERIES, FUZZ, NIFTI, CSV, RUN, VIEWER)

_DS = "tests/test_dicom_series.py::"
_DR = "tests/test_dicom_real.py::"
_RS = "tests/test_reliability_series.py::"
_FZ = "tests/test_fuzz_loader.py::"
_NI = "tests/test_nifti.py::"
_NV = "tests/test_nifti_volume.py::"
_MF = "tests/test_dicom_multiframe.py::"
_IM = "tests/test_importers.py::"
_PI2 = "tests/test_predict_inputs.py::"
_RI = "tests/test_reliability_inputs.py::"
_KI = "tests/test_kaggle_io.py::"
_AG = "tests/test_aggregate.py::"
_ME = "tests/test_metric.py::"
_PI = "tests/test_pipeline.py::"
_WE = "tests/test_web.py::"
_UP = "tests/test_uploads.py::"

CASES: tuple[Case, ...] = (
    # ------------------------------------------------------------------ DICOM series
    Case(SERIES, "Folder does not exist", "`DicomSeriesError`: `<path>: folder does not exist`.",
         (_DS + "test_empty_and_missing_folders_raise",)),
    Case(SERIES, "Empty folder", "`DicomSeriesError`: `<path>: folder is empty`.",
         (_DS + "test_empty_and_missing_folders_raise",)),
    Case(SERIES, "A single-frame file given where the study folder is expected",
         "`DicomSeriesError`: `<path>: not a folder, and not a multi-frame file` (a multi-frame file is a series).",
         (_RS + "test_a_file_given_as_the_folder_raises_naming_it", _MF + "test_a_single_frame_file_is_still_not_a_study")),
    Case(SERIES, "Enhanced CT frames without a Plane Position, or one frame with a corrupt position",
         "The frame is left out and named (`<file> frame <k>`) with the cause, the hole reported as a gap; "
         "too few usable frames: `DicomSeriesError` naming the file and the first frames.",
         (_MF + "test_frames_without_positions_are_refused_naming_the_file_and_the_group",
          _MF + "test_one_bad_frame_position_is_dropped_and_reported")),
    Case(SERIES, "Enhanced CT whose per-frame functional groups do not match its frame count",
         "`DicomSeriesError` naming the file and both counts.",
         (_MF + "test_per_frame_item_count_must_match_the_frames",)),
    Case(SERIES, "Non-DICOM files mixed in (README, thumbnails)",
         "Skipped; a warning names them. A folder with no DICOM at all: `DicomSeriesError` (no readable DICOM).",
         (_DS + "test_non_dicom_file_is_skipped_with_warning", _DS + "test_folder_without_dicom_or_pixels_raises")),
    Case(SERIES, "Truncated file (cut in the header or in the pixel data)",
         "The slice is dropped and named with the cause, the hole is reported as a gap. If fewer than 90 % "
         "(`min_valid_fraction`) of the slices load: `DicomSeriesError` naming the folder and the bad files.",
         (_DS + "test_truncated_file_is_dropped_and_named", _DS + "test_truncated_header_is_dropped_and_named",
          _DS + "test_too_many_bad_files_raise_naming_folder_and_file")),
    Case(SERIES, "File without pixel data",
         "Dropped and named (`no pixel data`); a folder where no file has pixels: `DicomSeriesError`.",
         (_DS + "test_file_without_pixel_data_is_dropped_and_named",
          _DS + "test_folder_without_dicom_or_pixels_raises")),
    Case(SERIES, "One slice",
         "A one-slice volume; its thickness comes from SpacingBetweenSlices / SliceThickness, else 1 mm, "
         "with a warning either way.",
         (_DS + "test_single_slice", _RS + "test_single_slice_without_thickness_assumes_1_mm_with_warning",
          _DR + "test_bad_sequence_file_loads_as_a_series_with_warnings")),
    Case(SERIES, "Two interleaved series in one folder (e.g. a scout)",
         "The series with the most slices is kept; a warning lists the others and their files. A tie is "
         "broken by SeriesInstanceUID, so the choice does not depend on file names.",
         (_DS + "test_interleaved_series_keeps_the_larger",
          _RS + "test_tied_interleaved_series_choice_does_not_depend_on_file_names")),
    Case(SERIES, "Duplicate slice positions",
         "The first file (in file-name order) at each position is kept; a warning names dropped and kept files.",
         (_DS + "test_duplicate_positions_keep_one",)),
    Case(SERIES, "A missing slice (gap)",
         "Volume kept with its true positions, slice step = median step, a warning names the gap and its files.",
         (_DS + "test_gap_is_reported_and_spacing_is_the_median_step",
          _DS + "test_truncated_file_is_dropped_and_named")),
    Case(SERIES, "Non-uniform slice spacing without a gap",
         "Steps more than 10 % from the median are reported with their range; the true positions travel with the "
         "volume; ±5 % scanner jitter is not reported.",
         (_RS + "test_uneven_steps_without_a_gap_are_warned_and_positions_kept",
          _RS + "test_small_jitter_is_not_reported")),
    Case(SERIES, "Mixed matrix sizes",
         "The minority size is dropped and named; when the majority is under 90 % of the files: `DicomSeriesError`.",
         (_DS + "test_mixed_matrix_sizes",)),
    Case(SERIES, "Per-slice RescaleSlope / RescaleIntercept",
         "Each slice is rescaled with its own values (float32, no float64 copy).",
         (_DS + "test_rescale_is_per_slice",)),
    Case(SERIES, "RescaleSlope / RescaleIntercept NaN, infinite, overflowing float32, or slope 0",
         "Checked in the header pass: both must be finite, the slope non-zero and |slope| × 2³² + |intercept| below "
         "the float32 maximum, else the slice is dropped and named (`RescaleSlope … / RescaleIntercept … cannot give "
         "finite HU`) and the hole reported as a gap; below `min_valid_fraction`: `DicomSeriesError` naming the file. "
         "Never non-finite HU.",
         (_RS + "test_non_finite_or_zero_rescale_is_refused",)),
    Case(SERIES, "Signed / unsigned mismatch",
         "PixelRepresentation and BitsStored are honoured per slice, also mixed within one series (12-bit data "
         "is masked or sign-extended like pydicom); a JPEG 2000 stream whose signedness contradicts the header is "
         "corrected like pydicom.",
         (_DS + "test_signed_and_unsigned_storage", _DS + "test_bits_stored_below_allocated_matches_pydicom",
          _RS + "test_signed_unsigned_and_12_bit_slices_mixed_in_one_series",
          _DR + "test_pixel_representation_mismatch_in_j2k_stream")),
    Case(SERIES, "Reversed order (file 1 is the most inferior slice; feet-first orientation)",
         "Sorted superior → inferior along the slice normal; `reversed_numbering` records it for mask alignment.",
         (_DS + "test_reversed_numbering_is_put_superior_first",
          _DS + "test_feet_first_orientation_still_superior_first")),
    Case(SERIES, "Shuffled order (file names and InstanceNumbers that disagree with the positions)",
         "Sorted by ImagePositionPatient projected on the slice normal, never by name or InstanceNumber.",
         (_DS + "test_order_comes_from_positions_not_names",
          _RS + "test_order_follows_positions_when_names_and_instance_numbers_both_disagree")),
    Case(SERIES, "JPEG data that one decoder rejects",
         "The next decoder (GDCM ↔ pylibjpeg) decodes it to the same array; the fallback is recorded in "
         "`Volume.warnings`.",
         (_DS + "test_decoder_fallback_is_used_and_recorded", _DR + "test_fallback_decoder_gives_the_same_array",
          _DR + "test_gdcm_and_pylibjpeg_agree")),
    Case(SERIES, "JPEG Lossless slice that every decoder rejects",
         "Dropped and named with each decoder's error, in-process and in the forked decoder workers; the hole is "
         "reported as a gap.",
         (_RS + "test_jpeg_slice_every_decoder_rejects_is_dropped_and_named",)),
    Case(SERIES, "JPEG Lossless frame cut short (GDCM rejects it, pylibjpeg decodes a partial image)",
         "Before any decoder sees it, a JPEG / JPEG-LS / JPEG 2000 frame must end with its end-of-image marker "
         "`FFD9` (within its last 16 bytes); otherwise the slice is dropped and named (`compressed frame is "
         "truncated (no end-of-image marker)`), and the other slices keep their true images.",
         (_RS + "test_truncated_jpeg_frame_is_not_decoded_into_a_wrong_slice",)),
    Case(SERIES, "A header worker process dies (series of 64+ files read by the forked workers)",
         "The failure is logged (`header pool failed …; reading headers in-process instead`) and the headers are "
         "read in-process; the volume and its warnings are the same as with one worker.",
         ("tests/test_dicom_fast_paths.py::test_a_dead_header_worker_is_recovered_in_process",)),
    Case(SERIES, "A decoder worker process dies (compressed series decoded by the forked workers)",
         "The broken pool is reported and the slices are decoded in-process instead; the volume is complete. (A "
         "crash that repeats in-process would abort the parent: the streams that made GDCM abort are refused before "
         "decoding, see the fuzzing rows.)",
         (_RS + "test_a_dead_decoder_worker_is_recovered_by_decoding_in_process",)),
    Case(SERIES, "Huge slice counts (1,500 × 64², 160 × 512²)",
         "Memory stays bounded: measured peak RSS growth 1.03 × the float32 output for 512² slices and 2.2 × for "
         "1,500 64² slices (the parsed headers, ~20 kB each); the test allows 1.5 × output + 32 kB per slice.",
         (_RS + "test_memory_stays_bounded_on_huge_slice_counts",)),
    Case(SERIES, "Gantry tilt",
         "Data kept (not resampled), a warning gives the angle; the affine follows the real slice positions, and "
         "masks round-trip exactly through NIfTI.",
         (_DS + "test_gantry_tilt_warns_and_keeps_data", _NI + "test_round_trip_is_exact")),
    # ------------------------------------------------------------------ fuzzing
    Case(FUZZ, "Random byte flips, overwrites, truncations, insertions and deletions in the header or pixel data "
               "of real files (CT, JPEG Lossless, JPEG 2000, JPEG-LS, RLE) and small real series",
         "A Volume that keeps its contract (finite HU, consistent shapes, orthonormal cosines, invertible affine, "
         "slices ordered along the slice direction) or `DicomSeriesError`. 120 derandomized hypothesis examples, "
         "each load in a forked child so that crashes and hangs are seen; any other outcome (another exception, a "
         "crash, a hang, a broken volume) fails.",
         (_FZ + "test_byte_mutations_give_a_valid_volume_or_the_project_error",
          _FZ + "test_isolation_tells_crash_hang_exception_and_error_apart",
          _FZ + "test_volume_problems_flags_each_broken_invariant")),
    Case(FUZZ, "Header fields set to invalid values (matrix, bits, PixelRepresentation, PhotometricInterpretation, "
               "NumberOfFrames, rescale, position, orientation, spacing, UIDs, transfer syntax) or deleted",
         "As above: a valid Volume or `DicomSeriesError` (120 derandomized examples).",
         (_FZ + "test_header_field_mutations_give_a_valid_volume_or_the_project_error",)),
    Case(FUZZ, "Corrupt RLE segment (decodes past the end of the frame)",
         "pylibjpeg-rle panics (pyo3's `PanicException`, a `BaseException`); the loader catches any decoder's "
         "`BaseException` but KeyboardInterrupt / SystemExit as that decoder's failure, so the next one (pydicom's "
         "own RLE decoder) reads the slice and `Volume.warnings` names the file and the panic; when every decoder "
         "fails, the slice is dropped and named.",
         (_FZ + "test_regression_rle_segment_overrun",
          _RI + "test_prediction_run_survives_a_study_whose_decoder_panics")),
    Case(FUZZ, "TransferSyntaxUID that is not a transfer syntax",
         "File refused and named in the header pass (`unknown transfer syntax '<uid>'`).",
         (_FZ + "test_regression_unknown_transfer_syntax",)),
    Case(FUZZ, "Compressed data GDCM cannot handle (32/64-bit JPEG Lossless, JPEG 2000 with a corrupt SIZ header or "
               "a colour PhotometricInterpretation)",
         "Refused and named before any decoder runs: the header pass requires BitsAllocated ∈ {8, 16} for "
         "compressed data (8, 16 or 32 native), SamplesPerPixel = 1 and MONOCHROME1/2 (`not a grey-level image: "
         "…`), and the frame's own size (JPEG / JPEG-LS SOF, JPEG 2000 SIZ) must be Rows × Columns with one "
         "component (`compressed frame is … the header says …`).",
         (_FZ + "test_regression_gdcm_abort_on_32_bit_jpeg_lossless",
          _FZ + "test_regression_gdcm_abort_on_corrupt_jpeg2000_header")),
    Case(FUZZ, "JPEG Lossless (the RSNA syntax) or JPEG-LS frame header with 0 lines",
         "Refused and named before any decoder runs: the frame header's lines × samples must equal Rows × "
         "Columns (`compressed frame is 0x512 … the header says 512x512 grey`), so libjpeg never sees it.",
         (_FZ + "test_regression_jpeg_lossless_zero_lines",)),
    Case(FUZZ, "Rows / Columns corrupted to 65535",
         "Checked per file before the volume is allocated: Rows × Columns above 8192² (`implausible matrix …`) or "
         "native pixel data shorter than the matrix needs refuses the file, named; a volume that still cannot be "
         "allocated is a `DicomSeriesError` naming the folder, never a `MemoryError`.",
         (_FZ + "test_regression_huge_matrix",)),
    Case(FUZZ, "ImagePositionPatient near 1e300",
         "A coordinate beyond ±1e5 mm is not a patient position: the slice is dropped and named (`no valid "
         "ImagePositionPatient`); below `min_valid_fraction`: `DicomSeriesError` naming the file.",
         (_FZ + "test_regression_position_overflow",)),
    Case(FUZZ, "ImageOrientationPatient with parallel or non-orthogonal cosines",
         "Both cosines must be unit vectors (±0.01) and |row · col| < 0.01, else the slice is dropped and named "
         "(`no valid ImageOrientationPatient`); below `min_valid_fraction`: `DicomSeriesError` naming the files.",
         (_FZ + "test_regression_parallel_orientation_cosines",)),
    # ------------------------------------------------------------------ NIfTI
    Case(NIFTI, "Wrong shape for its study", "`NiftiError` naming the file and both shapes.",
         (_NI + "test_wrong_shape_raises_naming_the_file",)),
    Case(NIFTI, "Wrong affine: another place, an LPS affine stored as RAS, singular, non-finite",
         "`NiftiError` naming the file (no overlap with the study, or singular affine).",
         (_NI + "test_non_overlapping_affine_raises", _RI + "test_wrong_affine_is_refused_naming_the_file")),
    Case(NIFTI, "Grid shifted against the study",
         "Up to 10 % outside: labels copied exactly, the rest background, with a warning; more: `NiftiError`.",
         (_NI + "test_one_slice_shift_is_filled_with_background_and_warned",
          _RI + "test_grid_shifted_beyond_the_overlap_threshold_is_refused")),
    Case(NIFTI, "Grid that is not an axis permutation of the study (finer, rotated)",
         "Nearest-neighbour resampling through the affines, with a warning.",
         (_NI + "test_finer_grid_is_resampled_nearest_with_warning",)),
    Case(NIFTI, "Unknown label values (> 19, negative, fractional, NaN)",
         "Set to 0; a `SegmentationWarning` lists the values.",
         (_NI + "test_unknown_label_values_are_zeroed_with_warning", _NI + "test_float_storage_with_fractional_values",
          _RI + "test_negative_and_nan_labels_are_zeroed_with_warning")),
    Case(NIFTI, "Empty mask", "Returned as all zeros with a `SegmentationWarning`.", (_NI + "test_empty_mask_warns",)),
    Case(NIFTI, "Unreadable file, missing file, 2-D or 4-D data", "`NiftiError` naming the file.",
         (_NI + "test_unreadable_and_non_3d_files_raise",)),
    Case(NIFTI, "A NIfTI CT (`io.nifti.load_nifti_volume`) that is 2-D, holds NaN, has a singular affine or is "
         "not NIfTI", "`NiftiError` naming the file and the cause; values that do not look like HU are kept "
         "with a warning.",
         (_NV + "test_implausible_files_raise_naming_the_file", _NV + "test_unreadable_file_raises_naming_it",
          _NV + "test_values_that_are_not_hounsfield_units_are_reported")),
    Case(NIFTI, "An imported case (`import-labels`) without any C1-C7 label, or whose image cannot be read",
         "Skipped (no cervical label; the labels it has are listed) or failed (the cause) in "
         "`import_report.csv`; the other cases are imported.",
         (_IM + "test_real_totalsegmentator_example_is_read_and_skipped_as_an_abdomen",
          _IM + "test_totalsegmentator_per_structure_masks_and_a_failing_case",
          _IM + "test_verse_and_ctspine1k_cases_keep_c1_to_c7_where_they_were")),
    # ------------------------------------------------------------------ CSV
    Case(CSV, "Missing columns (train.csv, test.csv, train_bounding_boxes.csv)",
         "`LayoutError` naming the file, the missing and the found columns.",
         (_KI + "test_train_label_errors", _KI + "test_test_csv_errors", _KI + "test_bounding_box_errors")),
    Case(CSV, "Unknown study ids",
         "Predictions for studies not in test.csv are left out (logged); submission or OOF rows for unknown "
         "studies are refused (`SubmissionError` / CV report error); shards cut from another test.csv are "
         "refused; train.csv studies without images are listed as cache failures and skipped.",
         (_AG + "test_missing_or_non_finite_study_gets_fallback", _ME + "test_refuses_extra_rows",
          "tests/test_cv_report.py::test_refuses_unknown_or_duplicated_studies",
          _PI + "test_merge_refuses_missing_duplicated_and_foreign_shards",
          "tests/test_seg_preprocess.py::test_build_cache_lists_a_broken_study_and_goes_on")),
    Case(CSV, "Duplicated row_ids or StudyInstanceUIDs",
         "`LayoutError` (test.csv, train.csv) or `SubmissionError` (submission, metric) naming them; a refused "
         "write leaves the previous submission intact.",
         (_KI + "test_test_csv_errors", _KI + "test_train_label_errors", _AG + "test_write_submission_validation",
          _ME + "test_refuses_duplicated_rows")),
    Case(CSV, "Bad values (labels not 0/1, empty StudyInstanceUID, unknown prediction_type, non-numeric boxes)",
         "`LayoutError` naming the file and example rows.",
         (_KI + "test_train_label_errors", _KI + "test_test_csv_errors", _KI + "test_bounding_box_errors")),
    Case(CSV, "test.csv rows whose study has no images (no folder, empty folder, non-DICOM files)",
         "That study gets the prior (train.csv prevalence), a warning names it and the cause, and the submission is "
         "complete, in test.csv order.",
         (_PI + "test_broken_studies_get_the_prior_and_the_file_is_complete", _KI + "test_studies_without_images")),
    Case(CSV, "test.csv saved by a spreadsheet (UTF-8 BOM, CRLF line ends, padded cells)",
         "Read exactly like the clean file.",
         (_RI + "test_spreadsheet_saved_test_csv_reads_like_the_clean_file",)),
    Case(CSV, "test.csv with a header and no rows",
         "A `CSpineError` and no submission file (never an empty submission).",
         (_RI + "test_empty_test_csv_writes_no_submission",)),
    # ------------------------------------------------------------------ runs
    Case(RUN, "One broken study (non-DICOM files, missing folder) among good ones",
         "A complete, valid submission in test.csv order; the broken study gets the prior; the good studies' "
         "predictions are bit-identical to a run without it; the failure is logged with study and cause and in "
         "`<submission>.timings.csv`.",
         (_PI + "test_broken_studies_get_the_prior_and_the_file_is_complete",
          _PI + "test_failure_is_logged_with_study_and_cause",
          _PI + "test_good_studies_do_not_depend_on_the_broken_ones")),
    Case(RUN, "A study whose decoder panics (corrupt RLE slice) among good ones",
         "A complete submission; the good studies' predictions are unchanged. The loader reads the slice with the "
         "fallback decoder and the panic is logged and named in `<submission>.timings.csv`; a panic that escapes "
         "any stage makes that study fail like any broken study (the prior), never the run.",
         (_RI + "test_prediction_run_survives_a_study_whose_decoder_panics",)),
    Case(RUN, "Degenerate studies that do load (one 1×1 slice, 2×2×2 voxels, 1-pixel-high slices)",
         "Predicted; vertebrae not found take their prior; patient_overall follows the rule; notes logged.",
         (_RI + "test_degenerate_studies_are_predicted_with_the_prior_for_absent_vertebrae",)),
    Case(RUN, "A scan with no cervical spine in view (a few slices of skull base or thorax, an abdomen), or one "
              "stage 1 labels implausibly (swapped labels, a vertebra in the brain or the tongue, one cut by the "
              "scan's edge, one of lumbar size)",
         "Stage 1's anatomical QC (`seg.qc`) drops every vertebra that does not fit its level's size, is cut by the "
         "scan or the fine box, or is off the one ordered column; a dropped vertebra leaves the mask, is never "
         "cropped and takes the prior; its reason is logged and written to `vertebrae.csv`, the `qc` column of "
         "`<submission>.timings.csv` and the explain pictures.",
         ("tests/test_seg_qc.py::test_swapped_labels_are_dropped_and_what_is_kept_is_in_its_true_place",
          "tests/test_seg_qc.py::test_c1_and_c2_in_the_brain_are_dropped_and_c3_to_c7_kept",
          "tests/test_seg_qc.py::test_a_vertebra_moved_into_the_tongue_is_dropped",
          "tests/test_seg_qc.py::test_a_vertebra_cut_by_the_edge_of_the_scan_needs_most_of_its_height_in_view",
          "tests/test_seg_qc.py::test_a_vertebra_of_lumbar_size_is_dropped",
          "tests/test_seg_qc.py::test_no_labelling_of_a_real_partial_series_passes",
          "tests/test_seg_cascade.py::test_no_cervical_spine_found_means_an_empty_mask_and_every_vertebra_absent",
          "tests/test_seg_cascade.py::test_the_cascade_runs_on_real_series_and_claims_at_most_one_vertebra")),
    Case(RUN, "No usable models", "Every study gets the prior; the submission is complete; the cause is logged.",
         (_PI + "test_missing_models_still_write_a_complete_prior_submission",)),
    Case(RUN, "Kaggle notebook: a bundle file truncated, changed or missing (fails `SHA256SUMS`)",
         "The pipeline is not run; every test.csv row gets the training prior, in test.csv order; a banner names "
         "the files.",
         ("tests/test_notebook.py::test_a_corrupted_bundle_gives_the_prior_and_says_why",)),
    Case(RUN, "Kaggle notebook: the image lacks dependencies or has them too old; minimums nobody can meet offline",
         "Only the missing/too-old requirements with a wheel in the bundle are installed (`--no-index --no-deps`), "
         "satisfied ones are left alone, the project wheel falls back to `--no-deps`; if the project still cannot "
         "be imported, the prior is written for every row and the reason printed.",
         ("tests/test_submission_bundle.py::"
          "test_notebook_install_cell_in_a_fresh_venv_installs_only_what_is_missing_then_falls_back_to_the_prior",)),
    Case(RUN, "Kaggle notebook: the prediction run as a whole raises (bad setting)",
         "The prior for every row, the reason printed.",
         ("tests/test_notebook.py::test_a_failing_prediction_gives_the_prior_and_says_why",)),
    Case(RUN, "Training config names a pretrained weights file that is absent, or of another architecture",
         "Training stops before any data work with a `ConfigError` naming the file and how to get it; weights "
         "that do not fit the backbone are a `ConfigError` naming the file and the model.",
         ("tests/test_cls_model.py::test_gpu_configs_need_their_weights_file_and_say_how_to_get_it",
          "tests/test_cls_model.py::test_weights_of_another_architecture_are_a_config_error")),
    Case(RUN, "Interrupted prediction run",
         "A rerun resumes from the finished studies' parts and writes the same submission; changed settings "
         "recompute everything.",
         (_PI + "test_rerun_resumes_from_parts_and_recomputes_after_a_settings_change",)),
    Case(RUN, "Interrupted or partly failed batch (predict-seg, stage-1 cache, crop cache)",
         "A rerun skips the studies finished under the same inputs and settings whose files exist, retries the "
         "failed ones and lists what still fails (`predict_failures.csv`, `cache_failures.csv`, "
         "`cache_index.csv`); other models or settings recompute everything, a crop cache of other settings is "
         "refused naming them; a dead worker process ends the batch with its unfinished studies listed as failed.",
         ("tests/test_runner.py::test_resume_skips_finished_studies_and_retries_failures",
          "tests/test_runner.py::test_a_ledger_that_refuses_other_settings_names_them",
          "tests/test_runner.py::test_workers_run_studies_in_other_processes_and_a_dead_worker_fails_its_studies",
          "tests/test_seg_cli.py::test_predict_seg_shards_fill_one_folder_and_other_weights_redo_it",
          "tests/test_crops.py::test_cache_from_a_synthetic_kaggle_layout_matches_the_phantom")),
    Case(RUN, "Interrupted submission write (disk full, killed)", "The previous submission.csv stays intact.",
         (_AG + "test_interrupted_write_keeps_previous_file",)),
    Case(RUN, "Interrupted training run (stage 1 and stage 2)",
         "Resuming from the checkpoint gives weights identical to an uninterrupted run (same seed, CPU).",
         ("tests/test_seg_train.py::test_resume_gives_the_same_weights_as_an_uninterrupted_run",
          "tests/test_cls_train.py::test_resume_equals_uninterrupted_and_oof_is_written",
          "tests/test_engine.py::test_checkpoint_resume_continues_identically")),
    Case(RUN, "Config file or override with a renamed, moved or removed key (e.g. `epochs`, `augment`, "
         "`data.mask_source`, `model.box_logits`)",
         "`ConfigError` naming each old key and its new name (or the command it moved to, or that it is no longer a "
         "setting), before anything runs.",
         ("tests/test_config.py::test_configs_stored_by_the_old_schema_translate_to_todays",
          "tests/test_prepare.py::test_the_cpu_budget_is_shared_and_moved_training_keys_say_where_they_went",
          "tests/test_twod.py::test_config_refuses_bad_values")),
    Case(RUN, "Checkpoint written before the common config schema",
         "Its stored config is translated to today's keys and the model predicts as trained; one trained with a "
         "removed setting switched on is refused with a `ConfigError` naming the file and the setting.",
         ("tests/test_config.py::test_an_old_stage2_checkpoint_still_predicts_and_a_retired_model_is_refused",)),
    Case(RUN, "`predict --inputs` with an unreadable study, or a train.csv without labelled rows (`--data`)",
         "The study's row gets the prior the stage-2 checkpoints store, status `failed` and the cause; the table "
         "is complete. An empty train.csv: the models' prior. Checkpoints without a stored prior: the real "
         "prevalence, with a warning.",
         (_PI2 + "test_one_study_in_any_form_gives_the_same_row_and_a_broken_one_gets_the_stored_prior",
          _PI2 + "test_kaggle_layout_with_an_empty_train_csv_predicts_with_the_models_prior",
          _PI2 + "test_checkpoints_without_a_stored_prevalence_fall_back_to_the_real_one")),
    Case(RUN, "Missing, incomplete or foreign prepared cache (train-seg, train-cls, with or without torchrun)",
         "The trainers never decode DICOM: every rank stops before joining the process group with a `LayoutError` "
         "naming the cache folder, how many studies are neither prepared nor failed and the `rsna-cspine prepare` "
         "command, or a `ConfigError` naming each stage-1 input (grid, window, the cascade's spacings and margin) or "
         "crop setting that differs from the config; "
         "nothing is written. Studies whose preparation failed, without crops or in `data.exclude` are left out, logged.",
         ("tests/test_cls_train.py::test_an_incomplete_or_foreign_cache_is_refused_before_joining_a_group",
          "tests/test_cls_train.py::test_studies_without_crops_or_excluded_are_left_out",
          "tests/test_seg_cli.py::test_train_seg_refuses_a_missing_or_foreign_cache_and_prepare_fills_it",
          "tests/test_prepare.py::test_trainers_train_from_a_prepared_cache_without_touching_dicom")),
    Case(RUN, "Interrupted, partly failed or sharded `rsna-cspine prepare`",
         "Each prepared study is recorded at once; a rerun resumes where the run stopped and gives the same cache as "
         "an uninterrupted run; only a study whose files, segmentation or boxes changed is redone; other settings "
         "are refused naming them (or start afresh with `--restart`); a failing study is listed with its reason in "
         "`manifest.csv` (its stale files no longer offered) while the others are prepared, exit code 1; shards "
         "fill one folder, or folders that `--merge` joins (refusing other settings), equal to one unsharded run.",
         ("tests/test_prepare.py::test_a_killed_run_resumes_where_it_stopped_and_equals_an_uninterrupted_one",
          "tests/test_prepare.py::test_a_corrupt_study_is_listed_as_failed_and_the_rest_are_prepared",
          "tests/test_prepare.py::test_shards_and_merged_shard_folders_equal_one_unsharded_run")),
    Case(RUN, "Stage-1 checkpoint written before the cascade (whole study on the grid)",
         "Predicts as it was trained (no localiser, the whole volume resampled to the grid); a checkpoint whose "
         "config asks for the cascade but carries no localiser is refused with a `CSpineError` naming the file.",
         ("tests/test_seg_cascade.py::"
          "test_an_old_whole_volume_checkpoint_predicts_as_before_and_a_cascade_one_without_localiser_is_refused",)),
    Case(RUN, "Killed while writing a checkpoint",
         "The previous checkpoint stays intact and loadable; the next save succeeds.",
         (_RI + "test_checkpoint_write_killed_midway_keeps_the_previous_checkpoint",)),
    # ------------------------------------------------------------------ viewer
    Case(VIEWER, "Request whose Host is not the viewer (DNS rebinding: `Host: evil.example`, another port, none)",
         "400 `unknown Host header` before any route runs: no job ids, results or pictures; `127.0.0.1:<port>` and "
         "`localhost:<port>` are answered.",
         (_WE + "test_foreign_host_headers_are_refused",)),
    Case(VIEWER, "Cross-site request: a post whose `Sec-Fetch-Site` is cross-site or same-site, whose `Origin` is "
                 "another origin or `null`, or whose `Referer` is another site; a cross-site fetch or embedded picture",
         "403 `request from another site refused`; no job, no file. A link from another site (a top-level "
         "navigation) still opens the page.",
         (_WE + "test_cross_site_posts_are_refused", _WE + "test_reads_from_other_sites_are_refused_but_links_work")),
    Case(VIEWER, "Post without the page's form token, with a wrong one, or with the token after the file",
         "403 naming the token, checked before the first byte of the file is written; nothing left.",
         (_WE + "test_posts_need_the_page_token",)),
    Case(VIEWER, "Zip bomb: 1 GiB of zeros in a small zip, many members over the unpacked total, sizes that lie",
         "413 from the central directory before anything is unpacked: a member may grow at most 100 times "
         "(members up to 4 MiB exempt), the study at most `--max-unpacked-mb` (3072); a member holding more than "
         "it declares is cut at that size and refused (400, bad CRC); the job folder is removed.",
         (_WE + "test_a_zip_bomb_is_refused_before_it_is_unpacked",
          _UP + "test_zip_bombs_are_refused_from_the_central_directory",
          _UP + "test_a_member_whose_declared_size_lies_is_stopped_at_that_size")),
    Case(VIEWER, "Malformed zip: empty or overlong member names, corrupt deflate data, cut short, random damage",
         "400 naming the problem (`empty name`, `name too long`, `unreadable zip (…)`, `not a file the viewer "
         "reads`), never a 500 and never a server path; 150 derandomized damaged zips are unpacked or refused, "
         "and a refused one leaves nothing.",
         (_WE + "test_malformed_zips_get_a_400_naming_the_problem",
          _UP + "test_bad_member_names_are_refused_with_a_400_naming_the_problem",
          _UP + "test_randomly_damaged_zips_unpack_or_are_refused_and_never_crash")),
    Case(VIEWER, "Zip with `..` or absolute paths, links, files in several folders, too many files, not a zip",
         "400 (413 for too many files) naming the member; nothing is written.",
         (_UP + "test_unsafe_or_ambiguous_zips_are_refused_before_anything_is_written",
          _UP + "test_links_and_files_of_no_known_kind_are_refused", _WE + "test_bad_requests_get_clear_messages")),
    Case(VIEWER, "Upload over `--max-upload-mb`, or cut off midway (the client goes away)",
         "413 from Content-Length or as soon as the bytes pass the bound; a cut-off upload's folder is removed.",
         (_WE + "test_bad_requests_get_clear_messages", _WE + "test_an_upload_cut_off_midway_leaves_nothing")),
    Case(VIEWER, "Uploaded studies left running (patient DICOM on disk)",
         "An upload is received into its job folder under `--work-dir`; its study files are deleted once the "
         "pictures and table are made; a failed job's folder at once; beyond `--keep-jobs` (20) finished jobs the "
         "oldest are removed; every job folder when the viewer stops, and those of a killed viewer at the next "
         "start. Error messages name the study, not the server's paths.",
         (_WE + "test_upload_shows_the_pipeline_probabilities_then_deletes_the_study",
          _WE + "test_finished_jobs_are_bounded_and_nothing_outlives_the_server",
          _WE + "test_picking_a_folder_runs_it_and_later_studies_wait_with_progress")),
    Case(VIEWER, "A large upload being unpacked while other pages are asked for",
         "Receiving and unpacking run in worker threads: pages keep being answered during the unpack (median "
         "under 0.5 s on a loaded 2-core machine).",
         (_WE + "test_pages_answer_while_a_large_upload_is_unpacked",)),
    Case(VIEWER, "A study of one slice (predicted, then drawn)",
         "Every picture is drawn (outlines of planes one pixel high included, the sagittal title saying the plane "
         "is one row); a picture that still cannot be drawn is listed with the reason, never fails the job.",
         (_WE + "test_a_one_slice_study_gets_every_picture_it_can_have",
          _WE + "test_a_picture_that_cannot_be_drawn_is_listed_with_the_reason")),
    Case(VIEWER, "Framing, injected scripts, API schema probing",
         "Every answer has `X-Frame-Options: DENY`, a Content-Security-Policy (scripts only with the response's "
         "nonce, `frame-ancestors 'none'`), `nosniff`, `Cache-Control: no-store`; `/openapi.json` and the docs "
         "pages are 404.",
         (_WE + "test_index_offers_upload_study_folders_and_the_form_token",)),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(cases: tuple[Case, ...] = CASES) -> str:
    """The Markdown document for ``cases``.

    Args:
        cases: the rows, grouped by :data:`AREAS` in that order.
    """
    known = sum(1 for case in cases if case.bug)
    lines = [
        "# Failure matrix",
        "",
        "<!-- Generated by `python -m tests.failure_matrix --write` from tests/failure_matrix.py; do not edit. -->",
        "",
        "Every bad input the project is tested against, what the program does with it, and the tests that prove "
        "it. Errors are the project's types (`rsna_cspine.errors`), and each message names the file and the cause; "
        "repairs are listed in `Volume.warnings` and logged. tests/test_reliability_inputs.py fails when this "
        "document is stale or names a test that no longer exists.",
        "",
        f"{len(cases)} inputs; {known} are **known bugs**: their tests are `xfail(strict=True)` and turn red "
        "once the bug is fixed, so that the marker is removed with it."
        if known else
        f"{len(cases)} inputs, no known bug: every row is proven by passing tests. (A bug found later gets a "
        "`bug=` text in tests/failure_matrix.py and strict-xfail tests until it is fixed.)",
    ]
    for area in AREAS:
        rows = [case for case in cases if case.area == area]
        if not rows:
            continue
        lines += ["", f"## {area}", "", "| Bad input | What the program does | Proven by |", "|---|---|---|"]
        for case in rows:
            does = f"**Known bug** — today: {case.bug}. Required: {case.behaviour}" if case.bug else case.behaviour
            proven = "<br>".join(f"`{test}`" for test in case.tests)
            lines.append(f"| {_cell(case.bad_input)} | {_cell(does)} | {proven} |")
    return "\n".join(lines) + "\n"


def referenced_files(cases: tuple[Case, ...] = CASES) -> list[str]:
    """The test files the matrix names, sorted."""
    return sorted({test.split("::")[0] for case in cases for test in case.tests})


def defined_tests(path: str | Path) -> dict[str, bool]:
    """Test functions defined in a test file (``name`` or ``Class::name``) → whether one is marked xfail.

    Read from the source, so that checking does not import (and run the imports of) every test module.

    Args:
        path: a test file, relative to the repository root or absolute.
    """
    tree = ast.parse((ROOT / path).read_text())
    found: dict[str, bool] = {}

    def xfail(node: ast.FunctionDef) -> bool:
        return any("xfail" in ast.unparse(decorator) for decorator in node.decorator_list)

    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            found[node.name] = xfail(node)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                    found[f"{node.name}::{item.name}"] = xfail(item)
    return found


def main(argv: list[str] | None = None) -> int:
    """Print, write or check the document.

    Args:
        argv: ``--write`` or ``--check`` (default: print to stdout).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {DOC_PATH.relative_to(ROOT)}")
    group.add_argument("--check", action="store_true", help="exit 1 when the document is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH} ({len(CASES)} rows)")
        return 0
    if args.check:
        current = DOC_PATH.read_text() if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH} is stale: run python -m tests.failure_matrix --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
