"""A worker that refuses its input (a UserError: a node whose GPU driver is too old, bf16 on a GPU without it, ...)
ends the Ray Train run at once, instead of after `FailureConfig(max_failures)` restarts that would refuse again.

How Ray Train V2 (2.60) decides, read from its source: the controller polls the worker group, and a poll with
worker errors becomes a WorkerGroupError, which its DefaultFailurePolicy always retries while max_failures lasts
(there is no per-exception rule, and the policy is not pluggable: `create_failure_policy` is fixed). A
ControllerError, though, is retried only for the two start-up errors it lists (RETRYABLE_CONTROLLER_ERRORS), and a
TrainingFailedError raised inside a control-loop step goes to the policy as it is. The worker group runs its
callbacks on every poll, before the controller looks at the errors; so a callback that sees a UserError among them
raises it as a ControllerError, and the policy's answer is RAISE: the run ends, the workers are shut down, and
`fit()` raises that ControllerError (`controller_failure` is the worker's UserError), which the driver prints as
one line (`gan_ray.train.driver.worker_user_error`).
"""
from __future__ import annotations

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2.api.exceptions import ControllerError

from gan_ray.core.errors import UserError


class StopOnUserError(WorkerGroupCallback):
    """Given to every TorchTrainer (`gan_ray.train.driver.trainer_for`): a worker's UserError fails the run now."""

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        for _, error in sorted(worker_group_status.errors.items()):
            if isinstance(error, UserError):
                raise ControllerError(UserError(str(error)))


def user_error_of(exc: BaseException) -> UserError | None:
    """The UserError a worker refused with, from Train's failure (a StopOnUserError ControllerError, or a
    WorkerGroupError whose workers raised one); None if there is none."""
    failure = getattr(exc, "controller_failure", None)
    if isinstance(failure, UserError):
        return UserError(str(failure))
    for error in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(error, UserError):
            return UserError(str(error))
    return None
