"""A GPU worker's start-up check (gan_ray/train/gpu_check.py) and how a worker's refusal ends a Ray Train run at once
(gan_ray/train/refusals.py). No GPU here: the check reads this machine's real driver sources (none), the version
parser reads what real drivers print, and the refusal runs a real TorchTrainer on the session cluster."""
from __future__ import annotations

import sys

import pytest

from gan_ray.core.errors import UserError
from gan_ray.train import gpu_check

# What real drivers print: /proc/driver/nvidia/version of the proprietary and of the open kernel module, and
# `nvidia-smi --query-gpu=driver_version --format=csv,noheader` on a 2-GPU node.
PROC_PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                    "GCC version:  gcc version 11.4.0 (Ubuntu 11.4.0-1ubuntu1~22.04)\n")
PROC_OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
             "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025\nGCC version:  gcc version 13.3.0\n")
SMI = "580.82.07\n580.82.07\n"


def test_driver_versions_are_read_from_what_drivers_print():
    assert gpu_check.parse_driver_version(PROC_PROPRIETARY) == "535.104.05"
    assert gpu_check.parse_driver_version(PROC_OPEN) == "580.65.06"
    assert gpu_check.parse_driver_version(SMI) == "580.82.07"
    assert gpu_check.parse_driver_version("GCC version:  gcc version 11.4.0") is None


def test_driver_version_sources_kernel_module_first_then_nvidia_smi(tmp_path):
    proc = tmp_path / "version"
    proc.write_text(PROC_OPEN)
    smi = (sys.executable, "-c", f"print({SMI!r}, end='')")  # a real process printing what nvidia-smi prints
    assert gpu_check.driver_version(proc, smi) == "580.65.06"
    assert gpu_check.driver_version(tmp_path / "absent", smi) == "580.82.07"
    failing = (sys.executable, "-c", "import sys; sys.exit(9)")  # nvidia-smi without a working driver exits != 0
    assert gpu_check.driver_version(tmp_path / "absent", failing) is None
    assert gpu_check.driver_version(tmp_path / "absent", ("gan-ray-no-such-nvidia-smi",)) is None


def test_the_needed_driver_follows_the_cuda_build():
    import torch

    assert gpu_check.needed_driver("13.0") == 580 and gpu_check.needed_driver("12.8") == 525
    assert gpu_check.needed_driver(None) is None
    assert gpu_check.needed_driver(torch.version.cuda) == 580  # the pinned torch is a CUDA 13 build


@pytest.mark.parametrize("cuda,driver,works,says", [
    ("13.0", "535.104.05", False, "NVIDIA driver 535.104.05 is too old: this PyTorch's CUDA 13.0 needs driver >= 580"),
    ("13.0", None, False, "no NVIDIA driver found"),
    ("13.0", "580.65.06", False, "CUDA 13.0 does not start with NVIDIA driver 580.65.06: no device"),
    (None, "580.65.06", True, "CPU-only build"),
])
def test_each_problem_is_one_sentence_naming_the_driver_needed(cuda, driver, works, says):
    problem = gpu_check.gpu_problem(cuda, driver, works, "no device")
    assert problem and says in problem and "\n" not in problem
    assert gpu_check.gpu_problem("13.0", "580.65.06", True) is None
    assert gpu_check.gpu_problem("13.0", "590.1", True) is None


def test_this_node_is_refused_in_one_line_naming_it(monkeypatch):
    """This machine has no NVIDIA driver (its real sources say so): the check refuses, naming the node (the
    Kubernetes node name, when the pod was given it, and the pod) and the driver it needs."""
    if gpu_check.driver_version() is not None:
        pytest.skip("this machine has an NVIDIA driver")
    monkeypatch.setenv(gpu_check.NODE_ENV, "ip-10-0-1-23.ec2.internal")
    with pytest.raises(UserError) as err:
        gpu_check.check_gpu_worker()
    line = str(err.value)
    assert "\n" not in line and line.startswith("GPU worker on node ip-10-0-1-23.ec2.internal (pod ")
    assert "needs driver >= 580" in line


def test_every_trainer_stops_on_a_workers_user_error():
    from gan_ray.core.config import TrainConfig
    from gan_ray.train.driver import trainer_for
    from gan_ray.train.refusals import StopOnUserError

    trainer = trainer_for(TrainConfig(storage="/tmp/unused", name="x"), callbacks=[])
    assert any(isinstance(c, StopOnUserError) for c in trainer.run_config.callbacks)


def refusing_loop(config):
    """A Train worker that refuses its input, counting its attempts in a file."""
    with open(config["attempts"], "a") as f:
        f.write("x")
    raise UserError("GPU worker on node n1: NVIDIA driver 535.104.05 is too old")


@pytest.mark.slow
def test_a_workers_user_error_ends_the_run_at_once_despite_max_failures(ray_cluster, tmp_path):
    """Ray Train retries a worker error max_failures times; a refusal would only refuse again (the same node, the
    same input): with StopOnUserError the first one ends the run, and the driver gets the worker's line."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from gan_ray.train.driver import worker_user_error
    from gan_ray.train.refusals import StopOnUserError

    attempts = tmp_path / "attempts"
    trainer = TorchTrainer(refusing_loop, train_loop_config={"attempts": str(attempts)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="refuse", storage_path=str(tmp_path / "runs"),
                                                failure_config=FailureConfig(max_failures=2),
                                                callbacks=[StopOnUserError()]))
    with pytest.raises(TrainingFailedError) as err:
        trainer.fit()
    assert attempts.read_text() == "x", "the run was retried after a refusal"
    error = worker_user_error(err.value)
    assert isinstance(error, UserError) and str(error) == "GPU worker on node n1: NVIDIA driver 535.104.05 is too old"
