"""The one atomic writer (``io.files.atomic_open``) under every kind of output the project writes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from rsna_cspine.io.files import atomic_open, atomic_write_text, sha256_file


def test_text_bytes_npz_and_torch_outputs_round_trip(tmp_path) -> None:
    text = atomic_write_text(tmp_path / "deep" / "a.csv", "row_id,fractured\nx_C1,0.5\n")
    assert text.read_text(encoding="utf-8") == "row_id,fractured\nx_C1,0.5\n"
    arrays = {"mask": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "spacing": np.array([1.0, 0.5, 0.5])}
    with atomic_open(tmp_path / "m.npz", "wb") as fh:
        np.savez_compressed(fh, **arrays)
    with np.load(tmp_path / "m.npz") as back:
        assert set(back.files) == set(arrays) and all(np.array_equal(back[k], v) for k, v in arrays.items())
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    with atomic_open(tmp_path / "c.pt", "wb") as fh:
        torch.save(state, fh)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "deep", "m.npz"]  # no temporary left
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path, mode: str) -> None:
    path = atomic_write_text(tmp_path / "out.bin", "old content")
    with pytest.raises(OSError, match="No space"), atomic_open(path, mode) as fh:
        fh.write("new con" if mode == "w" else b"new con")
        raise OSError("No space left on device")
    assert path.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_the_file_appears_only_when_the_block_ends(tmp_path) -> None:
    path = tmp_path / "late.txt"
    with atomic_open(path, "w") as fh:
        fh.write("complete")
        assert not path.exists()  # a reader never sees a half-written file under the final name
    assert path.read_text() == "complete"
    assert sha256_file(path) == hashlib.sha256(b"complete").hexdigest()


def test_only_new_files_are_written(tmp_path) -> None:
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"), atomic_open(tmp_path / "x", "a"):
        pass
