"""The per-study runner every batch job uses: shards, resume through the ledger, failures, workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from rsna_cspine.errors import ConfigError
from rsna_cspine.runner import StudyLedger, StudyRunner, StudySkipped, parse_shard, read_ledger, shard_studies

UIDS = [f"1.2.3.{k}" for k in range(7)]


class WriteOne:
    """A study function that writes ``<out>/<uid>.txt`` and remembers which studies it ran."""

    def __init__(self, out: Path, fail: set[str] = frozenset(), skip: set[str] = frozenset()) -> None:
        self.out, self.fail, self.skip, self.ran = out, set(fail), set(skip), []

    def __call__(self, uid: str) -> dict:
        self.ran.append(uid)
        if uid in self.skip:
            raise StudySkipped("not now")
        if uid in self.fail:
            raise ValueError(f"bad study {uid}")
        path = self.out / f"{uid}.txt"
        path.write_text(uid)
        return {"outputs": [str(path)], "length": len(uid)}


def test_resume_skips_finished_studies_and_retries_failures(tmp_path: Path) -> None:
    failures = tmp_path / "failures.csv"
    work = WriteOne(tmp_path, fail={UIDS[2]}, skip={UIDS[5]})
    runner = StudyRunner(StudyLedger(tmp_path / "finished", {"setting": 1}), progress=False, failures_csv=failures)
    report = runner.run(UIDS, work)
    assert [o.uid for o in report.outcomes] == UIDS
    assert [o.status for o in report.outcomes] == ["done", "done", "failed", "done", "done", "skipped", "done"]
    assert report.failures == {UIDS[2]: f"ValueError: bad study {UIDS[2]}"}
    assert report.outcomes[5].reason == "not now" and report.records[UIDS[0]]["length"] == len(UIDS[0])
    listed = pd.read_csv(failures, dtype=str)
    assert listed.to_dict("records") == [{"StudyInstanceUID": UIDS[2], "error": f"ValueError: bad study {UIDS[2]}"}]

    # A second run with the same fingerprint does only what is not finished: the failed and the skipped study.
    again = WriteOne(tmp_path)
    report = StudyRunner(StudyLedger(tmp_path / "finished", {"setting": 1}), progress=False, failures_csv=failures).run(
        UIDS, again)
    assert again.ran == [UIDS[2], UIDS[5]]
    assert report.count("resumed") == 5 and report.count("done") == 2 and not report.failures
    assert report.records[UIDS[0]] == {"outputs": [str(tmp_path / f"{UIDS[0]}.txt")], "length": len(UIDS[0])}
    assert not failures.exists()  # no failure left: the stale list is removed

    # A finished study whose output file is gone is redone; so is everything after a settings change.
    (tmp_path / f"{UIDS[3]}.txt").unlink()
    third = WriteOne(tmp_path)
    StudyRunner(StudyLedger(tmp_path / "finished", {"setting": 1}), progress=False).run(UIDS, third)
    assert third.ran == [UIDS[3]]
    changed = WriteOne(tmp_path)
    StudyRunner(StudyLedger(tmp_path / "finished", {"setting": 2}), progress=False).run(UIDS, changed)
    assert changed.ran == UIDS
    assert json.loads((tmp_path / "finished" / "fingerprint.json").read_text()) == {"setting": 2}
    # resume=False forgets the records even under the same fingerprint.
    fresh = WriteOne(tmp_path)
    StudyRunner(StudyLedger(tmp_path / "finished", {"setting": 2}, resume=False), progress=False).run(UIDS[:2], fresh)
    assert fresh.ran == UIDS[:2]


def test_a_ledger_that_refuses_other_settings_names_them(tmp_path: Path) -> None:
    StudyLedger(tmp_path, {"size": 32, "slices": 6}, on_change="refuse")
    StudyLedger(tmp_path, {"size": 32, "slices": 6}, on_change="refuse")  # the same settings are welcome
    with pytest.raises(ConfigError, match=r"other settings \(differs in \['size'\]\)"):
        StudyLedger(tmp_path, {"size": 64, "slices": 6}, on_change="refuse")


def test_read_ledger_lists_finished_studies_and_writes_nothing(tmp_path: Path) -> None:
    ledger = tmp_path / "finished"
    assert read_ledger(ledger, {"setting": 1}) == {} and not ledger.exists()  # no ledger yet: nothing built
    StudyRunner(StudyLedger(ledger, {"setting": 1}), progress=False).run(UIDS[:3], WriteOne(tmp_path))
    (tmp_path / f"{UIDS[1]}.txt").unlink()  # an output gone: that study is not built any more
    before = {p.name: p.stat().st_mtime_ns for p in ledger.iterdir()}
    assert sorted(read_ledger(ledger, {"setting": 1})) == [UIDS[0], UIDS[2]]
    with pytest.raises(ConfigError, match=r"differs in \['setting'\]"):
        read_ledger(ledger, {"setting": 2})
    assert {p.name: p.stat().st_mtime_ns for p in ledger.iterdir()} == before  # read only, also when refusing


def test_shards_split_the_list_and_fill_one_ledger(tmp_path: Path) -> None:
    assert parse_shard("1/3") == (1, 3)
    assert shard_studies(UIDS, (1, 3)) == [UIDS[1], UIDS[4]]
    ran = []
    for index in range(3):
        work = WriteOne(tmp_path)
        report = StudyRunner(StudyLedger(tmp_path / "finished", {}), shard=(index, 3), progress=False).run(UIDS, work)
        assert work.ran == UIDS[index::3] == [o.uid for o in report.outcomes]
        ran += work.ran
    assert sorted(ran) == sorted(UIDS)
    assert sorted(StudyLedger(tmp_path / "finished", {}).records()) == sorted(UIDS)


def report_pid(uid: str) -> dict:
    """Module level, so that spawned workers can unpickle it."""
    if uid.endswith(".3"):
        raise RuntimeError("this one fails")
    return {"pid": os.getpid()}


def die(uid: str) -> dict:
    os._exit(3)


@pytest.mark.slow
def test_workers_run_studies_in_other_processes_and_a_dead_worker_fails_its_studies(tmp_path: Path) -> None:
    report = StudyRunner(workers=2, progress=False).run(UIDS, report_pid)
    assert [o.uid for o in report.outcomes] == UIDS
    assert report.failures == {UIDS[3]: "RuntimeError: this one fails"}
    pids = {record["pid"] for record in report.records.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # A worker that dies takes its studies with it; the batch still ends and says why.
    report = StudyRunner(workers=1, progress=False, failures_csv=tmp_path / "f.csv").run(UIDS[:2], die)
    assert report.count("failed") == 2 and all("worker process died" in r for r in report.failures.values())
    assert len(pd.read_csv(tmp_path / "f.csv")) == 2


def test_a_ledger_with_relative_outputs_inputs_and_kept_failures(tmp_path: Path) -> None:
    from rsna_cspine.runner import read_failures

    inputs = {uid: 1 for uid in UIDS}
    ledger = StudyLedger(tmp_path / "cache" / "finished", {"s": 1}, base=tmp_path / "cache",
                         inputs=lambda uid: inputs[uid], keep_failures=True)
    (tmp_path / "cache" / "a.txt").write_text("x")
    ledger.save(UIDS[0], {"outputs": ["a.txt"], "inputs": 1})  # relative to the base folder, not the working one
    assert ledger.finished(UIDS[0]) is not None
    assert read_ledger(tmp_path / "cache" / "finished", None, base=tmp_path / "cache").keys() == {UIDS[0]}
    inputs[UIDS[0]] = 2  # the study's own inputs changed: it is not finished any more
    assert ledger.finished(UIDS[0]) is None
    ledger.save_failure(UIDS[0], "ValueError: bad", 1.5)  # its redo failed: the stale record goes, the failure stays
    assert not (tmp_path / "cache" / "finished" / f"{UIDS[0]}.json").exists()
    assert read_failures(tmp_path / "cache" / "finished") == {UIDS[0]: {"reason": "ValueError: bad", "seconds": 1.5}}
    ledger.save(UIDS[0], {"outputs": ["a.txt"], "inputs": 2})  # finished at last: no longer listed as failed
    assert read_failures(tmp_path / "cache" / "finished") == {} and ledger.finished(UIDS[0]) is not None
