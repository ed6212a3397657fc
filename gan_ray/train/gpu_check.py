"""The start-up check of a GPU worker: an NVIDIA driver new enough for this PyTorch's CUDA, and CUDA usable.

torch from PyPI brings its own CUDA runtime (torch 2.14.1 in constraints.txt: CUDA 13.0) but uses the node's kernel
driver, and each CUDA major release needs a minimum driver branch. A node with an older driver was found only at
the first CUDA call, deep in model set-up, after a job had waited up to 30 minutes for its GPU nodes; and as an
ordinary worker error it was retried (FailureConfig.max_failures) on the same node. So every GPU worker checks
first and refuses with one line naming its node and the driver it needs (a UserError: `gan_ray.train.refusals`
ends the run at once and the driver prints the line, exit code 2).

The driver version comes from the kernel module's own report (/proc/driver/nvidia/version, visible in containers
because /proc is the host kernel's), else from `nvidia-smi`; neither needs CUDA to work, so an old driver is named
even when CUDA refuses to start.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

from gan_ray.core.errors import UserError, one_line

# The oldest NVIDIA driver branch each CUDA major release runs on (NVIDIA's CUDA Toolkit release notes, "CUDA
# Toolkit and Corresponding Driver Versions"; minor-version compatibility within a major release).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
PROC_VERSION = Path("/proc/driver/nvidia/version")
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
NODE_ENV = "GAN_RAY_NODE_NAME"  # the Kubernetes node (the manifests set it from spec.nodeName)


def needed_driver(cuda: str | None) -> int | None:
    """The oldest driver branch for a CUDA version string ("13.0"), or None for a CPU build / an unknown major."""
    if not cuda:
        return None
    return MIN_DRIVER.get(int(cuda.split(".")[0]))


def parse_driver_version(text: str) -> str | None:
    """The driver version in what /proc/driver/nvidia/version or `nvidia-smi --query-gpu=driver_version` print
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..." / "580.65.06"), or None."""
    m = re.search(r"(?:Kernel Module(?: for \S+)?\s+|^\s*)(\d{3,}\.\d+(?:\.\d+)?)\b", text, flags=re.M)
    return m.group(1) if m else None


def driver_version(proc: Path = PROC_VERSION, smi: tuple[str, ...] = NVIDIA_SMI) -> str | None:
    """The node's NVIDIA driver version: the kernel module's report, else nvidia-smi's; None if there is neither."""
    try:
        found = parse_driver_version(proc.read_text())
        if found:
            return found
    except OSError:
        pass
    try:
        r = subprocess.run(list(smi), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_driver_version(r.stdout) if r.returncode == 0 else None


def node_name() -> str:
    """How the worker's node is named in messages: the Kubernetes node if the pod was told it, else the host."""
    host = socket.gethostname()
    node = os.environ.get(NODE_ENV)
    return f"{node} (pod {host})" if node and node != host else host


def gpu_problem(cuda: str | None, driver: str | None, cuda_works: bool, why_not: str = "") -> str | None:
    """What keeps this node from running the workers' CUDA code, as a sentence, or None if nothing does."""
    need = needed_driver(cuda)
    if cuda is None:
        return "this PyTorch is a CPU-only build: install a CUDA build on the GPU nodes"
    wanted = f"driver >= {need}" if need else "a driver for it"
    if driver is None:
        return f"no NVIDIA driver found (no {PROC_VERSION}, no nvidia-smi); CUDA {cuda} needs {wanted}"
    if need and int(driver.split(".")[0]) < need:
        return f"NVIDIA driver {driver} is too old: this PyTorch's CUDA {cuda} needs {wanted}"
    if not cuda_works:
        return f"CUDA {cuda} does not start with NVIDIA driver {driver}" + (f": {why_not}" if why_not else "")
    return None


def check_gpu_worker() -> None:
    """Refuse (UserError, one line naming the node and the driver it needs) to train on a node whose driver or
    CUDA cannot run this PyTorch. Called first thing in a GPU worker, before any CUDA call."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA is off as a warning
        warnings.simplefilter("always")
        works = torch.cuda.is_available() and torch.cuda.device_count() > 0
    why = one_line(str(caught[-1].message), 200) if caught else ""
    problem = gpu_problem(torch.version.cuda, driver_version(), works, why)
    if problem:
        raise UserError(f"GPU worker on node {node_name()}: {problem} (docs/deploy.md, \"GPU nodes\")")
