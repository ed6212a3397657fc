"""A sweep's results: one row per trial (results.csv), the console table, the fd-against-hyperparameters plot, and
the Tune callback that shows progress live (and releases stopped trials' worker placement groups).
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gan_ray.core.config import TrainConfig
from gan_ray.tune.placement import SweepGroups, release_placement_groups
from gan_ray.tune.space import DRIVER_CPU, METRIC, TIME_ATTR, Range, SearchSpace

RESULTS_CSV = "results.csv"
PLOT_FILE = "sweep.png"


@dataclass
class TrialRow:
    """One line of results.csv."""

    trial_id: str
    status: str  # completed | stopped early | running | pending | paused | error
    config: dict[str, Any]
    best_fd: float | None
    last_fd: float | None
    epochs: int
    best_checkpoint: str | None = None
    path: str | None = None


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _status(tune_status: str, epochs: int, max_epochs: int) -> str:
    if tune_status == "ERROR":
        return "error"
    if tune_status == "TERMINATED":
        return "completed" if epochs >= max_epochs else "stopped early"
    return tune_status.lower()


def row_from_trial(trial, dims: list[str], max_epochs: int, history: list[dict] | None = None) -> TrialRow:
    """A results row from a Tune Trial (live, from the callback) or from the finished experiment (with history:
    every report, so the best checkpoint can be found)."""
    last = trial.last_result or {}
    analysis = (trial.metric_analysis or {}).get(METRIC, {})
    best_fd, best_ckpt = _num(analysis.get("min")), None
    if history:
        scored = [(_num(r.get(METRIC)), r) for r in history]
        scored = [(fd, r) for fd, r in scored if fd is not None]
        if scored:
            best_fd = min(fd for fd, _ in scored)
        with_ckpt = [(fd, r["checkpoint_path"]) for fd, r in scored
                     if isinstance(r.get("checkpoint_path"), str) and Path(r["checkpoint_path"]).is_dir()]
        if with_ckpt:
            # The trial's best is its best checkpoint's fd: that is the model it can hand over. An epoch without
            # a checkpoint (--checkpoint-every N > 1) may have scored better, but nothing of it was kept, and the
            # sweep's winner, results.csv and the export's model.json must all speak of the same model.
            best_fd, best_ckpt = min(with_ckpt, key=lambda t: t[0])
    epochs = int(_num(last.get(TIME_ATTR)) or 0)
    return TrialRow(trial_id=trial.trial_id,
                    status=_status(trial.status, epochs, max_epochs),
                    config={k: trial.config.get(k) for k in dims}, best_fd=best_fd, last_fd=_num(last.get(METRIC)),
                    epochs=epochs, best_checkpoint=best_ckpt, path=trial.path)


def write_results_csv(rows: list[TrialRow], dims: list[str], path: Path) -> Path:
    """One row per trial (written to a temp file then renamed: a reader never sees half a table)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", *dims, "best_fd", "last_fd", "epochs", "best_checkpoint"])
        for r in sorted(rows, key=lambda r: r.trial_id):
            w.writerow([r.trial_id, r.status, *[r.config.get(d) for d in dims],
                        "" if r.best_fd is None else f"{r.best_fd:.6g}",
                        "" if r.last_fd is None else f"{r.last_fd:.6g}", r.epochs, r.best_checkpoint or ""])
    tmp.replace(path)
    return path


def read_results_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: list[TrialRow], dims: list[str], max_epochs: int) -> str:
    """The compact trial table printed as trials change state."""
    def val(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    header = ["trial", "status", *dims, "epoch", "fd", "best fd"]
    lines = [header]
    for r in sorted(rows, key=lambda r: r.trial_id):
        lines.append([r.trial_id, r.status, *[val(r.config.get(d)) for d in dims], f"{r.epochs}/{max_epochs}",
                      "-" if r.last_fd is None else f"{r.last_fd:.4g}", "-" if r.best_fd is None else f"{r.best_fd:.4g}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def plot_sweep(rows: list[TrialRow], dims: list[str], space: SearchSpace, path: Path) -> Path | None:
    """fd against lr_g, lr_d, latent_dim (and any other searched dimension): one panel each, best trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.best_fd is not None]
    if not scored:
        return None
    panels = [d for d in ("lr_g", "lr_d", "latent_dim")] + [d for d in dims if d not in ("lr_g", "lr_d", "latent_dim")]
    best = min(scored, key=lambda r: r.best_fd)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        def x_of(r: TrialRow) -> Any:
            return r.config.get(name, space.fixed.get(name, getattr(TrainConfig(), name)))

        categorical = any(isinstance(x_of(r), (str, bool)) for r in scored)
        for status, marker, face in (("completed", "o", "tab:blue"), ("stopped early", "o", "none"),
                                     ("error", "x", "tab:red")):
            group = [r for r in scored if r.status == status] if status != "completed" else \
                [r for r in scored if r.status not in ("stopped early", "error")]
            if group:
                xs = [str(x_of(r)) if categorical else x_of(r) for r in group]
                ax.scatter(xs, [r.best_fd for r in group], marker=marker, facecolors=face,
                           edgecolors="tab:blue" if marker == "o" else None, label=status)
        ax.scatter([str(x_of(best)) if categorical else x_of(best)], [best.best_fd], marker="*", s=220,
                   color="gold", edgecolors="black", zorder=3, label="best")
        dim = space.dims.get(name)
        if isinstance(dim, Range) and dim.log:
            ax.set_xscale("log")
        ax.set_xlabel(name + ("" if name in space.dims else " (fixed)"))
        ax.set_ylabel("best fd (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep: {len(rows)} trials, best fd {best.best_fd:.4g} ({best.trial_id})")
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def progress_callback():
    from ray.tune import Callback

    class SweepProgress(Callback):
        """Console table when a trial changes state, one line per reported epoch, a live results.csv; and the
        release of stopped trials' worker placement groups (see PlacementGroupRecorder)."""

        def __init__(self, dims: list[str], max_epochs: int, csv_path: str):
            self.dims, self.max_epochs, self.csv_path = dims, max_epochs, csv_path
            self._last_status: dict[str, str] = {}
            self._last_release = 0.0
            self._groups: SweepGroups | None = None

        def __getstate__(self) -> dict:  # pickled with the sweep's state: the groups belong to one driver job
            return {**self.__dict__, "_groups": None, "_last_status": {}}

        def setup(self, **info) -> None:  # each (re)start of the sweep, in the driver's job
            self._groups = SweepGroups([{"CPU": DRIVER_CPU}])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if METRIC in result:
                best = (trial.metric_analysis or {}).get(METRIC, {}).get("min", result[METRIC])
                print(f"[tune] {trial.trial_id}  epoch {result.get(TIME_ATTR, '?')}/{self.max_epochs}  "
                      f"fd {result[METRIC]:.4g}  (best {min(best, result[METRIC]):.4g})", flush=True)

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self._last_release >= 1.0:
                self._last_release = now
                self._release(trials)
            statuses = {t.trial_id: t.status for t in trials}
            if statuses == self._last_status:
                return
            self._last_status = statuses
            rows = [row_from_trial(t, self.dims, self.max_epochs) for t in trials]
            counts: dict[str, int] = {}
            for r in rows:
                counts[r.status] = counts.get(r.status, 0) + 1
            print(f"[tune] {time.strftime('%H:%M:%S')}  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                  flush=True)
            print(format_table(rows, self.dims, self.max_epochs), flush=True)
            write_results_csv(rows, self.dims, Path(self.csv_path))

        def _release(self, trials) -> None:
            accounted: set[str] = set()
            for t in trials:
                if t.path and t.status != "PENDING" and Path(t.path).is_dir():
                    accounted.update(release_placement_groups(Path(t.path), keep_latest_run=t.status == "RUNNING"))
            if self._groups is not None:
                self._groups.remove_orphans(accounted)

    return SweepProgress


def collect_rows(experiment: Path, dims: list[str], max_epochs: int) -> list[TrialRow]:
    """Final rows from the saved experiment (statuses, configs and every report of every trial)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        df = frames.get(trial.trial_id, frames.get(trial.path))  # keyed by trial id in Ray 2.60
        history = df.to_dict("records") if df is not None and len(df) else []
        rows.append(row_from_trial(trial, dims, max_epochs, history))
    return rows
