"""What decides a sweep's trials: the Tune search space, the schedulers (ASHA stops weak trials early, PBT evolves
learning rates) and the searchers (seeded random, or Optuna), each capped at the trials the cluster can hold.

The schedulers are Tune's, made to survive a resumed sweep: Tune does not save ASHA's rungs, and restores a
searcher's concurrency cap from the first run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from gan_ray.core.errors import UserError
from gan_ray.tune.space import TIME_ATTR, Choice, SearchSpace, SweepSettings

PBT_MUTABLE = ("lr_g", "lr_d")  # what the worker loop re-applies to the optimisers after an exploit
ASHA_STATE = "asha_rungs.json"  # ASHA's rung records, so a resumed sweep keeps comparing against them


def to_tune_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, dim in space.dims.items():
        if isinstance(dim, Choice):
            out[name] = tune.choice(list(dim.values))
        elif isinstance(dim.low, int) and isinstance(dim.high, int):
            out[name] = (tune.lograndint if dim.log else tune.randint)(dim.low, dim.high + 1)
        else:
            out[name] = (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)
    return out


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive a resume. Tune does not save scheduler state with the experiment (a
    restored sweep gets the scheduler as it was built), so a resumed ASHA would compare new trials against
    nothing and stop none; this one mirrors its rungs (`_brackets[i]._rungs`, Ray internals) to a JSON file."""

    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self.state_file = state_file
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self.state_file)
        if path.exists():
            for bracket, rungs in zip(self._brackets, json.loads(path.read_text())):
                for (_, recorded), saved in zip(bracket._rungs, rungs):
                    recorded.update(saved)

    def _save(self) -> None:
        path = Path(self.state_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps([[dict(recorded) for _, recorded in b._rungs] for b in self._brackets]))
        tmp.replace(path)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


class WholePopulationPBT(PopulationBasedTraining):
    """PBT that does not pause a healthy trial just because another one is pending, when the whole population
    fits at once (async PBT yields its slot to pending trials; here the pending one already has a slot, and the
    pause would only cost a Train restart)."""

    def __init__(self, *, whole_population_fits: bool, **kwargs):
        super().__init__(**kwargs)
        self.whole_population_fits = whole_population_fits

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if self.whole_population_fits and decision == TrialScheduler.PAUSE and trial.status != Trial.PAUSED:
            return TrialScheduler.CONTINUE
        return decision


def make_scheduler(settings: SweepSettings, space: SearchSpace, concurrency: int):
    from ray.tune.schedulers import FIFOScheduler

    if settings.scheduler == "asha":
        # stop_last_trials=False: a trial reaching --epochs ends by itself (Train shuts down cleanly) instead of
        # being killed on its last report
        return ResumableASHA(str(settings.path / ASHA_STATE), time_attr=TIME_ATTR, max_t=settings.epochs,
                                       grace_period=settings.grace_period,
                                       reduction_factor=settings.reduction_factor, stop_last_trials=False)
    if settings.scheduler == "pbt":
        mutable = {k: v for k, v in to_tune_space(space).items() if k in PBT_MUTABLE}
        if not mutable:
            raise UserError("--scheduler pbt mutates learning rates: search --lr-g and/or --lr-d (e.g. 1e-5:1e-3)")
        return WholePopulationPBT(whole_population_fits=concurrency >= settings.trials, time_attr=TIME_ATTR,
                                  perturbation_interval=settings.perturbation_interval,
                                  hyperparam_mutations=mutable, quantile_fraction=0.5, resample_probability=0.25,
                                  synch=False)
    return FIFOScheduler()


# The cap on running trials for this run of the sweep, from run_sweep to the searcher Tune restores (in this same
# driver process). Tune restores a searcher, its cap included, from the sweep's saved state, after Tuner.restore
# and out of reach of any public API; a resume on a smaller cluster (or with more workers per trial) must use the
# cap computed now: a stale, larger one starts trials whose workers can never be placed, the hang the cap prevents.
CONCURRENCY_ENV = "GAN_RAY_SWEEP_MAX_CONCURRENT"


class _CapOfThisRun:
    """Mixin for a searcher with `max_concurrent`: after Tune restores its state, the cap is this run's. (Tune
    restores state through `set_state`, directly or from `restore_from_dir`, for both kinds used here.)"""

    def set_state(self, state: dict) -> None:
        super().set_state(state)  # type: ignore[misc]
        if os.environ.get(CONCURRENCY_ENV):
            self.max_concurrent = int(os.environ[CONCURRENCY_ENV])


class SweepVariantGenerator(_CapOfThisRun, BasicVariantGenerator):
    """Random search (seeded), capped; the cap is this run's after a resume."""


class SweepConcurrencyLimiter(_CapOfThisRun, ConcurrencyLimiter):
    """A capped searcher (Optuna); the cap is this run's after a resume."""


def make_searcher(settings: SweepSettings, concurrency: int):
    """The search algorithm, capped at `concurrency` running trials (Tune ignores `max_concurrent_trials` for a
    BasicVariantGenerator passed in explicitly)."""
    if settings.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study on the sweep's own log
        return SweepConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=concurrency)
    return SweepVariantGenerator(random_state=settings.seed, max_concurrent=concurrency)  # same --seed, same trials
