"""Shard files of ``predict --shard i/n`` and ``merge``, which joins them into one submission.

A shard file is the shard's ``row_id,fractured`` rows behind a one-line JSON header (``# {...}``)
naming the shard, the number of shards, the test.csv checksum and the shard's studies, so that
:func:`merge_shards` can refuse an incomplete or mixed set.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from rsna_cspine.aggregate import write_submission
from rsna_cspine.errors import SubmissionError
from rsna_cspine.io.files import atomic_write_text, sha256_file
from rsna_cspine.io.kaggle import read_test_csv, test_studies

logger = logging.getLogger(__name__)

SHARD_FORMAT = "rsna-cspine-shard/1"


def write_shard(rows: pd.DataFrame, path: str | Path, shard: tuple[int, int], studies: list[str], test_csv: Path) -> Path:
    """Write one shard's rows behind a one-line JSON header (``# {...}``) that ``merge`` checks.

    Args:
        rows: ``row_id, fractured`` of the shard's studies.
        path: the shard file.
        shard: ``(i, n)``.
        studies: the shard's StudyInstanceUIDs, in test.csv order.
        test_csv: the test.csv the shard was cut from (its checksum goes into the header).
    """
    header = {
        "format": SHARD_FORMAT,
        "shard": shard[0],
        "n_shards": shard[1],
        "test_csv_sha256": sha256_file(Path(test_csv)),
        "studies": studies,
    }
    path = Path(path)
    atomic_write_text(path, "# " + json.dumps(header) + "\n" + rows.to_csv(index=False))
    logger.info("wrote shard %d/%d (%d studies, %d rows) to %s", shard[0], shard[1], len(studies), len(rows), path)
    return path


def read_shard(path: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Read a shard file written by :func:`write_shard`.

    Args:
        path: the shard file.

    Returns:
        ``(header, rows)``.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError("shard file not found", path)
    with path.open() as fh:
        first = fh.readline()
    try:
        header = json.loads(first[1:]) if first.startswith("#") else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
        raise SubmissionError(f"not a shard file (its first line must be '# {{\"format\": \"{SHARD_FORMAT}\", ...}}')", path)
    try:
        rows = pd.read_csv(path, skiprows=1, dtype={"row_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise SubmissionError(f"unreadable shard rows ({exc})", path) from exc
    if list(rows.columns) != ["row_id", "fractured"]:
        raise SubmissionError(f"shard columns must be row_id, fractured; got {list(rows.columns)}", path)
    return header, rows


def merge_shards(shard_files: list[str | Path], test_csv: str | Path, out_csv: str | Path) -> pd.DataFrame:
    """Join shard files into one submission in test.csv order.

    Refuses (``SubmissionError``) shards of different ``n`` or of another test.csv, a shard index
    missing or given twice, a study in two shards or in none, and rows that do not match the shard's
    studies exactly.

    Args:
        shard_files: every shard file of one run (``predict --shard i/n``), any order.
        test_csv: the test.csv the shards were cut from.
        out_csv: the merged submission (written atomically and validated).

    Returns:
        The merged submission (``row_id, fractured``) in test.csv order.
    """
    test_csv = Path(test_csv)
    test = read_test_csv(test_csv)
    test_sha = sha256_file(test_csv)
    if not shard_files:
        raise SubmissionError("no shard files given")
    shards: dict[int, tuple[Path, dict[str, Any], pd.DataFrame]] = {}
    counts: set[int] = set()
    for file in map(Path, shard_files):
        header, rows = read_shard(file)
        index, count = int(header["shard"]), int(header["n_shards"])
        counts.add(count)
        if header.get("test_csv_sha256") != test_sha:
            raise SubmissionError(f"shard was cut from another test.csv than {test_csv}", file)
        if index in shards:
            raise SubmissionError(f"shard {index}/{count} given twice (also {shards[index][0]})", file)
        shards[index] = (file, header, rows)
    if len(counts) != 1:
        raise SubmissionError(f"shards disagree on the number of shards: {sorted(counts)}")
    (count,) = counts
    missing = sorted(set(range(count)) - set(shards))
    if missing:
        raise SubmissionError(f"missing shard(s) {missing} of {count}; got {sorted(shards)}")
    uids = test_studies(test)
    owner: dict[str, int] = {}
    for index, (file, header, rows) in sorted(shards.items()):
        for uid in header["studies"]:
            if uid in owner:
                raise SubmissionError(f"study {uid} is in shard {owner[uid]} and shard {index}", file)
            owner[uid] = index
        expected = set(test.loc[test["StudyInstanceUID"].isin(header["studies"]), "row_id"])
        got = set(rows["row_id"].astype(str))
        if got != expected or len(rows) != len(got):
            raise SubmissionError(
                f"rows do not match the shard's {len(header['studies'])} studies: "
                f"{len(expected - got)} missing, {len(got - expected)} extra, {len(rows) - len(got)} duplicated",
                file,
            )
    absent = [uid for uid in uids if uid not in owner]
    if absent:
        raise SubmissionError(f"{len(absent)} test.csv studies are in no shard, e.g. {absent[:5]}")
    unknown = sorted(set(owner) - set(uids))
    if unknown:
        raise SubmissionError(f"{len(unknown)} shard studies are not in {test_csv}, e.g. {unknown[:5]}")
    merged = pd.concat([rows for _, _, rows in shards.values()], ignore_index=True)
    write_submission(merged, out_csv, test)
    logger.info("merged %d shards (%d studies) into %s", count, len(uids), out_csv)
    return pd.read_csv(out_csv, dtype={"row_id": str})
