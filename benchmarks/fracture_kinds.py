"""Which synthetic fractures a submission finds: each fractured vertebra's rank among intact ones, by kind.

Pooled AUC says how well a model ranks vertebrae, not which fractures it misses. The generator records what
it did to each fractured vertebra (``synth_studies.csv``, ``fracture_kinds``: ``"break:body"``,
``"line:posterior_arch"``, ``"displaced"``, ``"compression"``, ...). This script scores every fractured
vertebra by the share of intact vertebrae *of the same level and set* that the submission ranks below it
(ties count half): 1 is found every time, 0.5 is chance. Averaged by kind, and split by whether the body was
compressed, it shows what the model has learned to see.

Run (from the repository root), on a demo's test split or on cross-check sets, any number of folders each
with ``submission.csv`` and ``data/synth_studies.csv``:
    .venv/bin/python benchmarks/fracture_kinds.py demo work/xcheck/seed101 work/xcheck/seed202 work/xcheck/seed303
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def vertebra_rows(submission: pd.DataFrame, studies: pd.DataFrame, set_name: str) -> pd.DataFrame:
    """One row per (study, vertebra) of the ``studies`` that ``submission`` scores: set, level, label,
    probability, kinds (:func:`report.heldout.vertebra_table`, which refuses a study scored in part).

    Args:
        submission: ``row_id, fractured`` (``<uid>_C1`` ...).
        studies: the generator's ``synth_studies.csv`` (``StudyInstanceUID``, ``C1``..``C7``, ``fracture_kinds``).
        set_name: names the set (ranks are taken within a set).
    """
    from rsna_cspine.report.heldout import vertebra_table

    scored = {row_id.rsplit("_", 1)[0] for row_id in submission["row_id"].astype(str)}
    studies = studies[studies["StudyInstanceUID"].astype(str).isin(scored)]
    table = vertebra_table(submission, studies)
    kinds = {str(uid): json.loads(k) if isinstance(k, str) else {}
             for uid, k in zip(studies["StudyInstanceUID"], studies["fracture_kinds"])}
    table["kinds"] = [tuple(kinds[uid].get(level, ())) for uid, level in zip(table["StudyInstanceUID"], table["vertebra"])]
    table.insert(0, "set", set_name)
    return table.rename(columns={"vertebra": "level"})[["set", "level", "label", "probability", "kinds"]]


def outranked_share(rows: pd.DataFrame) -> pd.DataFrame:
    """The fractured rows of ``rows``, each with ``outranked``: the share of intact rows of its set and level
    with a lower probability (ties count half). A level without an intact row gives NaN."""
    fractured = rows[rows["label"] == 1].copy()
    shares = []
    for r in fractured.itertuples(index=False):
        intact = rows.loc[(rows["set"] == r.set) & (rows["level"] == r.level) & (rows["label"] == 0), "probability"]
        shares.append(float((intact < r.probability).mean() + 0.5 * (intact == r.probability).mean()) if len(intact) else np.nan)
    fractured["outranked"] = shares
    return fractured


def by_kind(fractured: pd.DataFrame) -> pd.DataFrame:
    """Mean ``outranked`` and count per kind (a vertebra counts once under each of its kinds), per level split
    by compression, and overall."""
    table = []
    compressed = fractured["kinds"].apply(lambda k: "compression" in k)
    for name, group in (("with compression", fractured[compressed]), ("without compression", fractured[~compressed])):
        table.append({"group": name, "level": "all", "n": len(group), "outranked": group["outranked"].mean()})
        for level, sub in group.groupby("level"):
            table.append({"group": name, "level": level, "n": len(sub), "outranked": sub["outranked"].mean()})
    for kind in sorted({k for kinds in fractured["kinds"] for k in kinds}):
        sub = fractured[fractured["kinds"].apply(lambda k, kind=kind: kind in k)]
        table.append({"group": f"kind {kind}", "level": "all", "n": len(sub), "outranked": sub["outranked"].mean()})
    return pd.DataFrame(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders with submission.csv and data/synth_studies.csv")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    rows = pd.concat([
        vertebra_rows(pd.read_csv(f / "submission.csv", dtype={"row_id": str}),
                      pd.read_csv(f / "data" / "synth_studies.csv", dtype={"StudyInstanceUID": str}), str(f))
        for f in args.folders
    ], ignore_index=True)
    table = by_kind(outranked_share(rows))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.json:
        args.json.write_text(table.to_json(orient="records", indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
