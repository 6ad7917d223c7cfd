"""A run folder: its resolved ``config.yaml`` and the per-epoch ``summary.csv`` with ``curves.png``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rsna_cspine.io.files import atomic_open


class SummaryLog:
    """Per-epoch metrics in ``run_dir/summary.csv`` (timm style) plus ``curves.png``.

    On resume, rows of epochs after the checkpoint's are dropped so the file matches the restored state.
    """

    def __init__(self, run_dir: str | Path, resume_epoch: int | None = None) -> None:
        self.path = Path(run_dir) / "summary.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_epoch is not None and self.path.is_file():
            with self.path.open() as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= resume_epoch]
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        if not self.rows:
            return
        fields: list[str] = []
        for row in self.rows:
            fields.extend(k for k in row if k not in fields)
        with atomic_open(self.path, "w") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        self.plot()

    def plot(self) -> Path | None:
        """Draw every numeric column against epoch into ``curves.png`` (losses and metrics apart)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plotting is a nicety, never a reason to stop training
            return None
        epochs = [int(r["epoch"]) for r in self.rows]
        columns = [k for k in self.rows[0] if k not in ("epoch", "lr", "time_s")]
        loss_cols = [c for c in columns if "loss" in c]
        metric_cols = [c for c in columns if c not in loss_cols]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, cols, title in ((axes[0], loss_cols, "losses"), (axes[1], metric_cols, "metrics")):
            for col in cols:
                values = []
                for r in self.rows:
                    try:
                        values.append(float(r.get(col, "nan")))
                    except (TypeError, ValueError):
                        values.append(float("nan"))
                ax.plot(epochs, values, marker="o", label=col)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if cols:
                ax.legend(fontsize=7)
        fig.tight_layout()
        out = self.path.with_name("curves.png")
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out


def prepare_run_dir(run_dir: str | Path, config: Any, resume: bool, write: bool = True) -> Path:
    """Create the run folder and write ``config.yaml``; refuse to overwrite a finished run unless resuming.

    Args:
        run_dir: the fold's run folder.
        config: the resolved config dataclass.
        resume: whether the run continues from ``last.pt``.
        write: create the folder and the file (rank 0); False only checks (every other rank, so that all
            ranks stop together on a refusal instead of waiting for rank 0 at the next collective).
    """
    from rsna_cspine.config import save_config
    from rsna_cspine.errors import ConfigError

    run_dir = Path(run_dir)
    if not resume and (run_dir / "last.pt").exists():
        raise ConfigError("run folder already holds a checkpoint; pass --resume or choose another folder", run_dir)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    return run_dir
