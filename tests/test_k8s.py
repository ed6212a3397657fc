"""The KubeRay manifests (k8s/) and `ray up` configs (cluster/), validated as strictly as this machine allows
(no Kubernetes, no cloud): the real KubeRay v1.7.0 CRD schemas with unknown fields rejected, Ray's own Serve
and autoscaler config schemas, the real gan-ray CLI parser for every entrypoint, kubernetes-validate for core
objects, and a security baseline for every container.
"""
from __future__ import annotations

import copy
import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from gan_ray.train.gpu_check import MIN_DRIVER  # the oldest NVIDIA driver branch per CUDA major release

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CLUSTER = ROOT / "cluster"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay" / "v1.7.0" / "crds"


def find_crds() -> Path | None:
    """The KubeRay v1.7.0 CRDs: $KUBERAY_CRDS, else ../shared/kuberay/v1.7.0/crds (where CI has them), else None."""
    import os

    for candidate in (os.environ.get("KUBERAY_CRDS"), SHARED_CRDS):
        if candidate and Path(candidate).expanduser().is_dir():
            return Path(candidate).expanduser()
    return None


CRD_DIR = find_crds()
needs_crds = pytest.mark.skipif(
    CRD_DIR is None, reason="KubeRay v1.7.0 CRDs not found: set KUBERAY_CRDS to a directory holding "
                            "ray.io_rayclusters.yaml, ray.io_rayjobs.yaml and ray.io_rayservices.yaml (from "
                            "github.com/ray-project/kuberay, ray-operator/config/crd/bases at v1.7.0)")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
RAY_KINDS = tuple(CRD_FILES)
IMAGE = "gan-ray:placeholder"


# ------------------------------------------------------------------------------------------------ loading
def manifests() -> list[tuple[str, dict]]:
    """(file name, object) for every object in every k8s/*.yaml except the kustomization (fresh copies)."""
    return copy.deepcopy(_manifests())


@lru_cache(maxsize=1)
def _manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                out.append((path.name, obj))
    return out


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, o) for f, o in manifests() if o["kind"] == kind]


def strict(schema: Any) -> Any:
    """The CRD schema with `additionalProperties: false` wherever it lists `properties` and does not preserve
    unknown fields: what the API server's structural pruning would silently drop becomes an error here."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: these CRDs are megabytes
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return strict(version["schema"]["openAPIV3Schema"])


def cluster_specs() -> Iterator[tuple[str, dict]]:
    """Every Ray cluster spec: the RayCluster's and those embedded in RayJobs and the RayService."""
    for f, o in manifests():
        spec = o.get("spec", {})
        if o["kind"] == "RayCluster":
            yield f, spec
        elif o["kind"] == "RayJob":
            yield f, spec["rayClusterSpec"]
        elif o["kind"] == "RayService":
            yield f, spec["rayClusterConfig"]


def pod_templates() -> Iterator[tuple[str, str, dict]]:
    """(file, group, pod spec) for every pod KubeRay would create, submitter pods included."""
    for f, spec in cluster_specs():
        yield f, "head", spec["headGroupSpec"]["template"]["spec"]
        for g in spec["workerGroupSpecs"]:
            yield f, g["groupName"], g["template"]["spec"]
    for f, o in of_kind("RayJob"):
        if "submitterPodTemplate" in o["spec"]:
            yield f, "submitter", o["spec"]["submitterPodTemplate"]["spec"]


def entrypoint_commands() -> list[tuple[str, list[str]]]:
    """Each `gan-ray ...` command in the RayJobs' entrypoints (split on shell `&&` / `;`)."""
    out = []
    for f, o in of_kind("RayJob"):
        for part in re.split(r"&&|;", o["spec"]["entrypoint"]):
            argv = shlex.split(part)
            assert argv, f"{f}: empty command in the entrypoint"
            assert argv[0] == "gan-ray", f"{f}: entrypoint runs {argv[0]!r}, not gan-ray"
            out.append((f, argv[1:]))
    return out


def serve_configs() -> list[tuple[str, dict]]:
    return [(f, yaml.safe_load(o["spec"]["serveConfigV2"])) for f, o in of_kind("RayService")]


# --------------------------------------------------------------------------------------------- the files
@needs_crds
def test_crds_are_found():
    assert all((CRD_DIR / f).is_file() for f in CRD_FILES.values())


def test_kustomization_ties_every_manifest_together():
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kz["kind"] == "Kustomization" and kz["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    listed = set(kz["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    names = {o["metadata"]["name"] for _, o in manifests() if o["kind"] == "Namespace"}
    assert kz["namespace"] in names
    assert [i["name"] for i in kz["images"]] == [IMAGE.split(":")[0]]
    for f, o in manifests():  # DNS-1035 labels: KubeRay derives Service names from them (keep room to append)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", o["metadata"]["name"]) and \
            len(o["metadata"]["name"]) <= 40, f
        for key, value in o["metadata"].get("labels", {}).items():
            assert re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", key), (f, key)
            assert re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", value) and len(value) <= 63
    kinds = {o["kind"] for _, o in manifests()}
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim", "Namespace"} <= kinds


# --------------------------------------------------------------------------------------------- KubeRay CRDs
@needs_crds
@pytest.mark.parametrize("name,obj", [m for m in manifests() if m[1]["kind"] in RAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v.get("metadata", {}).get("name"))
def test_manifest_validates_against_kuberay_crd(name, obj):
    assert obj["apiVersion"] == "ray.io/v1", name
    validator = jsonschema.Draft7Validator(crd_schema(obj["kind"]))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{name}: {'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


@needs_crds
def test_strict_schema_rejects_unknown_fields_and_bad_values():
    """The validator is not toothless: a typo'd field, a misplaced field, or a wrong enum all fail."""
    (_, cluster), = of_kind("RayCluster")
    schema = crd_schema("RayCluster")
    for mutate in (lambda o: o["spec"].__setitem__("enableInTreeAutoscalling", True),
                   lambda o: o["spec"]["workerGroupSpecs"][0].__setitem__("minReplica", 0),
                   lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                   .__setitem__("resource", {}),
                   lambda o: o["spec"]["autoscalerOptions"].__setitem__("version", "v3"),
                   lambda o: o["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "4")):
        bad = copy.deepcopy(cluster)
        mutate(bad)
        assert list(jsonschema.Draft7Validator(schema).iter_errors(bad)), mutate


def cel_guarded_paths(schema: dict, path: tuple = ()) -> Iterator[tuple]:
    """Property paths (list items as "*") whose schema carries CEL rules (x-kubernetes-validations)."""
    if schema.get("x-kubernetes-validations"):
        yield path
    for name, sub in schema.get("properties", {}).items():
        yield from cel_guarded_paths(sub, path + (name,))
    if isinstance(schema.get("items"), dict):
        yield from cel_guarded_paths(schema["items"], path + ("*",))


def present(obj: Any, path: tuple) -> bool:
    if not path:
        return True
    if path[0] == "*":
        return isinstance(obj, list) and any(present(x, path[1:]) for x in obj)
    return isinstance(obj, dict) and path[0] in obj and present(obj[path[0]], path[1:])


@needs_crds
def test_no_manifest_uses_fields_guarded_by_unchecked_cel_rules():
    """CEL rules (x-kubernetes-validations) are not evaluated here, so the fields they guard stay unused and
    nothing escapes validation."""
    for f, o in manifests():
        if o["kind"] not in RAY_KINDS:
            continue
        paths = list(cel_guarded_paths(crd_schema(o["kind"])))
        assert paths  # the walk finds them (deletionStrategy, managedBy, ...)
        for path in paths:
            assert not present(o, path), f"{f} uses {'.'.join(path)}, guarded by a CEL rule not checked here"


# What the RayService's cluster adds to raycluster.yaml's for high availability (rayservice.yaml's header): GCS
# fault tolerance, two GPU workers always up, those spread over nodes and zones, and the instance label its
# PodDisruptionBudgets select its pods by. Nothing else may differ.
SERVICE_HA_FIELDS = ("gcsFaultToleranceOptions", "replicas", "minReplicas", "topologySpreadConstraints",
                     "app.kubernetes.io/instance")
SERVICE_INSTANCE = "gan-ray-serve"


def without_service_ha(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    spec.pop("gcsFaultToleranceOptions", None)
    spec["headGroupSpec"]["template"]["metadata"]["labels"].pop("app.kubernetes.io/instance", None)
    for g in spec["workerGroupSpecs"]:
        g.pop("replicas", None)
        g.pop("minReplicas", None)
        g["template"]["metadata"]["labels"].pop("app.kubernetes.io/instance", None)
        g["template"]["spec"].pop("topologySpreadConstraints", None)
    return spec


def test_cluster_spec_is_the_same_everywhere():
    """One cluster design: the RayJobs embed the RayCluster's spec unchanged; the RayService embeds it plus its
    high-availability settings (SERVICE_HA_FIELDS) and nothing else."""
    specs = list(cluster_specs())
    (_, reference), = [(f, s) for f, s in specs if f == "raycluster.yaml"]
    for f, spec in specs:
        if f == "rayservice.yaml":
            assert spec != reference  # it does carry its HA settings
            assert without_service_ha(spec) == without_service_ha(reference), \
                f"{f}'s cluster spec differs from raycluster.yaml in more than {SERVICE_HA_FIELDS}"
        else:
            assert spec == reference, f"{f}'s cluster spec drifted from raycluster.yaml"


def test_head_runs_no_work_and_gpu_workers_autoscale():
    for f, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", f
        assert spec["enableInTreeAutoscaling"] is True
        opts = spec["autoscalerOptions"]
        assert opts["version"] == "v2" and opts["idleTimeoutSeconds"] > 0
        assert spec["authOptions"]["mode"] == "token"  # Ray >= 2.59 token auth stays on
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu_groups, f
        for g in gpu_groups:
            if f == "rayservice.yaml":  # two GPU workers always up: the two Serve replicas' nodes
                assert g["minReplicas"] == g["replicas"] == 2 and g["maxReplicas"] > 2
            else:  # jobs and the long-lived cluster start with none: the drivers wait for the autoscaler
                assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1
            pod = g["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])


def test_ray_versions_agree():
    """The image's Ray, every rayVersion and pyproject's pin are one version."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("ray[") or d.startswith("ray=")]
    pinned = pin.split("==")[1]
    dockerfile = (K8S / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert froms == [f"rayproject/ray:{pinned}-py311-gpu"]
    assert f"ray.__version__ == '{pinned}'" in dockerfile
    versions = {s["rayVersion"] for _, s in cluster_specs()}
    assert versions == {pinned}
    import ray

    assert ray.__version__ == pinned
    assert f"ray=={pinned}" in (ROOT / "constraints.txt").read_text().split()


def test_image_pins_the_tested_dependencies():
    """Every runtime dependency in pyproject.toml is pinned (==) in constraints.txt to a version its
    pyproject range allows (ray: exactly the tested one); the Dockerfile installs with those constraints and runs
    as the image's non-root user."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"unpinned: {line}"
            pins[name.lower()] = ver
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dep in pyproject["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower()
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}: pin {pins[name]} is outside {dep!r}"
    assert pins["ray"] == version("ray")
    dockerfile = (K8S / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and "--no-deps ." in dockerfile
    # the project goes in with --no-deps, so the pinned install before it must name every dependency
    (deps_run,) = [r for r in re.split(r"\n(?=[A-Z]+ )", dockerfile) if "-c constraints.txt" in r]
    installed = {re.split(r"[\[<>=!~ ]", w.strip('"'), maxsplit=1)[0].lower() for w in deps_run.split()}
    for dep in pyproject["project"]["dependencies"]:
        name = re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower()
        assert name in installed, f"k8s/Dockerfile does not install {name}"
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert users and all(u.split(":")[0] not in ("root", "0") for u in users)
    assert users[0] == "1000:100"  # set before any RUN, never switched back


# ----------------------------------------------------------------------------------------- pod security
def test_every_container_is_non_root_bounded_and_unprivileged():
    count = 0
    for f, group, pod in pod_templates():
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, (f, group)
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", (f, group)
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for vol in pod.get("volumes", []):
            assert "hostPath" not in vol, (f, group, vol)
        for c in pod["containers"] + pod.get("initContainers", []):
            count += 1
            assert c["image"] == IMAGE, (f, group)
            sc = c.get("securityContext", {})
            assert sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False, (f, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add")
            assert sc.get("runAsUser", psc["runAsUser"]) != 0
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], (f, c["name"], key)
    for f, spec in cluster_specs():  # the autoscaler sidecar KubeRay adds to the head
        opts = spec["autoscalerOptions"]
        assert opts["securityContext"]["allowPrivilegeEscalation"] is False
        assert opts["securityContext"]["privileged"] is False
        assert {"cpu", "memory"} <= set(opts["resources"]["limits"]) & set(opts["resources"]["requests"])
    assert count >= 8


def test_every_ray_node_serves_through_haproxy():
    """Serve reads RAY_SERVE_ENABLE_HA_PROXY when Ray starts on a node, so every Ray container must carry it."""
    count = 0
    for f, group, pod in pod_templates():
        if group == "submitter":  # runs `ray job submit`, not a Ray node
            continue
        for c in pod["containers"]:
            count += 1
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", (f, group, c["name"])
    assert count >= 8  # head and GPU workers of the RayCluster, both RayJobs and the RayService


def test_shared_storage_is_read_write_many_and_mounted_everywhere():
    (_, pvc), = [(f, o) for f, o in of_kind("PersistentVolumeClaim") if o["metadata"]["name"] == "gan-ray-shared"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # named, not the cluster's default (ReadWriteOnce on EKS, GKE and AKS: the claim would stay Pending)
    assert pvc["spec"]["storageClassName"] == "gan-ray-shared"
    for f, group, pod in pod_templates():
        if group == "submitter":
            continue
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get("/mnt/shared")) == pvc["metadata"]["name"], (f, group)


# ------------------------------------------------------------------------------------------------ RayJobs
def test_rayjobs_shut_down_after_the_job_with_a_ttl():
    jobs = of_kind("RayJob")
    assert {f for f, _ in jobs} == {"rayjob-train.yaml", "rayjob-tune.yaml"}
    for f, o in jobs:
        spec = o["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, f
        assert "clusterSelector" not in spec  # the job owns its cluster, so it can be shut down
        from ray.runtime_env import RuntimeEnv

        RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # Ray accepts the runtime env


def test_rayjob_entrypoints_parse_with_the_real_cli():
    from gan_ray.cli import build_parser

    commands = entrypoint_commands()
    assert {argv[0] for _, argv in commands} >= {"train", "tune"}
    for f, argv in commands:
        args = build_parser().parse_args(argv)  # a UserError (bad flag) fails the test with its message
        for flag in ("storage", "export", "out"):
            value = getattr(args, flag, None)
            if value:
                assert value.startswith("/mnt/shared/"), f"{f}: --{flag} {value} is not on the shared volume"
        if argv[0] == "train":
            from gan_ray.cli.flags import resolve_train_config

            cfg = resolve_train_config(args)
            assert cfg.gpus_per_worker > 0 and cfg.workers >= 2


def test_bad_entrypoint_is_caught_by_the_parser():
    from gan_ray.cli import build_parser
    from gan_ray.core.errors import UserError

    with pytest.raises(UserError):
        build_parser().parse_args(["train", "--gpus-per-wroker", "1"])


# --------------------------------------------------------------------------------------------- RayService
def test_serve_config_parses_with_rays_schema_and_imports():
    from ray.serve.schema import ServeDeploySchema

    (_, service), = of_kind("RayService")
    assert service["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    for f, cfg in serve_configs():
        schema = ServeDeploySchema.model_validate(cfg)
        (app,) = schema.applications
        assert app.import_path == "gan_ray.serve:app"
        assert app.args["model"].startswith("/mnt/shared/models/")
        # The model the sweep job exports is the model the service serves.
        (tune,) = [argv for _, argv in entrypoint_commands() if argv[0] == "tune"]
        assert tune[tune.index("--export") + 1] == app.args["model"]
        module_name, attr = app.import_path.split(":")
        module = importlib.import_module(module_name)
        builder = getattr(module, attr)
        assert callable(builder)
        from gan_ray.serve.schema import ServeArgs

        parsed = ServeArgs.model_validate(app.args)  # the app's own schema: unknown or bad args fail here
        assert parsed.min_replicas < parsed.max_replicas  # autoscaling, not a fixed size
        assert parsed.gpus_per_replica > 0


def test_serve_service_is_a_valid_core_service():
    import kubernetes_validate

    (_, service), = of_kind("RayService")
    svc = service["spec"]["serveService"]
    obj = {"apiVersion": "v1", "kind": "Service", **svc}
    kubernetes_validate.validate(obj, "1.30", strict=True)
    ports = [p["port"] for p in svc["spec"]["ports"]]
    (_, cfg), = serve_configs()
    assert cfg["http_options"]["port"] in ports


# ------------------------------------------------------------------------------------------ core objects
@pytest.mark.parametrize("name,obj", [m for m in manifests() if m[1]["kind"] not in RAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_core_objects_pass_kubernetes_validate(name, obj):
    import kubernetes_validate

    kubernetes_validate.validate(obj, "1.30", strict=True)
    bad = copy.deepcopy(obj)
    bad["spec" if "spec" in bad else "metadata"]["unknownField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)


_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "8Gi", "2") as a number; anything else fails the test."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    assert m, f"not a Kubernetes quantity: {value!r}"
    return float(m.group(1)) * _SUFFIX[m.group(2) or ""]


def test_resource_quantities_are_valid_and_requests_fit_limits():
    containers = [(f, c) for f, _, pod in pod_templates() for c in pod["containers"]]
    containers += [(f, {"name": "autoscaler", **s["autoscalerOptions"]}) for f, s in cluster_specs()]
    for f, c in containers:
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        for key, value in (req | lim).items():
            quantity(value)
        for key in req:
            assert quantity(req[key]) <= quantity(lim[key]), (f, c["name"], key)
        if "nvidia.com/gpu" in lim:  # extended resources: requests must equal limits
            assert req.get("nvidia.com/gpu", lim["nvidia.com/gpu"]) == lim["nvidia.com/gpu"]


def test_every_pod_template_is_a_valid_core_pod():
    """The pods KubeRay will create from the templates, checked as core Pods too (strict kubernetes-validate:
    quantities, enums, required container fields)."""
    import kubernetes_validate

    checked = 0
    for f, group, pod in pod_templates():
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{group}-pod"}, "spec": pod}
        kubernetes_validate.validate(obj, "1.30", strict=True)
        checked += 1
    assert checked == 10  # head + GPU workers of the 4 cluster specs, and the 2 job submitters


# --------------------------------------------------------------------------------------- `ray up` configs
@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_ray_up_config_validates_with_rays_schema(name):
    """What `ray up` does before touching the cloud: fill in the provider's defaults, then validate against
    ray/autoscaler/ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    gpu_types = [t for t, v in types.items() if t != head and v["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(types[t]["min_workers"] == 0 and types[t]["max_workers"] >= 1 for t in gpu_types)
    assert types[head]["resources"].get("CPU") == 0  # the head schedules no work
    # the project is installed on every node, with the same pins as the k8s image
    setup = " ".join(raw["setup_commands"])
    assert "constraints.txt" in setup and "pip install" in setup
    assert "/home/ray/gan-ray" in raw["file_mounts"]
    # a bucket mounted on every node at the same path: checkpoints and models survive nodes
    init = " ".join(raw["initialization_commands"])
    assert "/mnt/shared" in init and "/mnt/shared:/mnt/shared" in " ".join(raw["docker"]["run_options"])
    # token auth: every node gets the submitter's token and runs in token mode
    assert raw["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("RAY_AUTH_MODE=token" in c for c in raw[key] if "ray start" in c)


def test_ray_up_schema_rejects_unknown_fields():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_ray_up_workers_that_mount_the_bucket_carry_credentials(name):
    """s3fs / gcsfuse authenticate as the VM, and `ray up` gives an identity only to the head (Ray's AWS and GCP
    bootstrap put it in config["head_node"], applied to the head alone): every worker type that mounts the bucket
    must name its own instance profile / service account, or it cannot mount and never joins."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` works from: the credentials survive the defaults
    validate_config(config)
    provider = config["provider"]
    workers = {t: v for t, v in config["available_node_types"].items() if t != config["head_node_type"]}
    mounting = [t for t, v in workers.items()
                if re.search(r"\b(s3fs|gcsfuse)\b.*/mnt/shared",
                             " ".join(v.get("initialization_commands", config["initialization_commands"])))]
    assert mounting and mounting == list(workers), (name, mounting)  # every worker type mounts the bucket
    for t in mounting:
        node_config = workers[t]["node_config"]
        if provider["type"] == "aws":
            assert "iam_role=auto" in " ".join(config["initialization_commands"])  # s3fs uses the profile
            profile = node_config.get("IamInstanceProfile")
            assert isinstance(profile, dict) and (profile.get("Name") or profile.get("Arn")), (name, t)
            # not Ray's head profile: that one can launch instances, and job code runs on the workers
            assert "ray-autoscaler" not in str(profile.get("Name") or profile.get("Arn")), (name, t)
        elif provider["type"] == "gcp":
            accounts = node_config.get("serviceAccounts")
            assert accounts and len(accounts) == 1, (name, t)  # GCE allows one account per instance
            (account,) = accounts
            # the placeholder project is the one the file already asks the user to set
            assert account["email"].endswith(f"@{provider['project_id']}.iam.gserviceaccount.com"), account
            assert not account["email"].startswith("ray-autoscaler-sa"), account
            assert {"https://www.googleapis.com/auth/cloud-platform",
                    "https://www.googleapis.com/auth/devstorage.read_write"} & set(account["scopes"]), account
        else:
            pytest.fail(f"{name}: unexpected provider {provider['type']}")


# ------------------------------------------------------------------------------- documented kubectl commands
def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (=, ==, !=, in, notin, exists, !exists) against an object's labels."""
    for req in re.findall(r"[^,()]+(?:\([^)]*\))?", selector):
        req = req.strip()
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", req):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif m := re.fullmatch(r"(!?)([^!=\s]+)", req):
            if (m.group(2) in labels) == bool(m.group(1)):
                return False
        else:
            pytest.fail(f"cannot parse label selector requirement {req!r}")
    return True


def kubectl_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every kubectl command written in the README, the docs or the k8s/ files' comments."""
    sources = [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in [ROOT / "README.md",
                                                                         *sorted((ROOT / "docs").glob("*.md"))]]
    sources += [(p.relative_to(ROOT).as_posix(), "\n".join(line for line in p.read_text().splitlines()
                                                          if line.lstrip().startswith("#")))
                for p in sorted(K8S.rglob("*.yaml"))]
    out = []
    for where, text in sources:
        for m in re.finditer(r"\bkubectl\s[^`|;&#\n]*", text):
            out.append((where, shlex.split(m.group(0))))
    return out


def pod_labels() -> list[dict[str, str]]:
    """The labels of every pod the manifests make (Ray pods, job submitters, Redis)."""
    out = []
    for _, spec in cluster_specs():
        out += [g["template"]["metadata"]["labels"] for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]]
    out += [o["spec"]["submitterPodTemplate"]["metadata"]["labels"] for _, o in of_kind("RayJob")]
    out += [o["spec"]["template"]["metadata"]["labels"] for _, o in of_kind("Deployment")]
    return out


def job_cluster_labels() -> list[dict[str, str]]:
    """The labels of the RayClusters KubeRay v1.7 makes for the RayJobs: the RayJob's own labels (kustomize's
    included) plus ray.io/originated-from-cr-name / -crd (rayjob_controller.go, constructRayClusterForRayJob)."""
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    added = {k: v for group in kz.get("labels", []) for k, v in group["pairs"].items()}
    return [{**o["metadata"]["labels"], **added, "ray.io/originated-from-cr-name": o["metadata"]["name"],
             "ray.io/originated-from-crd": "RayJob"} for _, o in of_kind("RayJob")]


# What a label selector on live objects may select, by the kubectl resource it names.
LIVE_LABELS = {"pods": pod_labels, "pod": pod_labels, "po": pod_labels, "rayclusters": job_cluster_labels,
               "raycluster": job_cluster_labels}
GPU_KINDS = {"RayJob", "RayService", "RayCluster"}  # objects whose pods take GPU nodes


def option(argv: list[str], *names: str) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
    return values


def test_documented_commands_apply_the_image_rewrite():
    """The manifests name the placeholder image gan-ray:0.1.0, which only the kustomization's images: rewrites:
    a documented `kubectl ... -f k8s/FILE` would pull docker.io/library/gan-ray:0.1.0 (ImagePullBackOff). Every
    documented command that names a manifest file must therefore get it through kustomize (-k), and each label
    selector used with -k must pick what it says: each RayJob alone, or everything but the jobs."""
    # the selector evaluator below follows Kubernetes' semantics (notin also matches an absent key)
    labels = {"app.kubernetes.io/component": "train-job", "app.kubernetes.io/name": "gan-ray"}
    assert selector_matches("app.kubernetes.io/component=train-job", labels)
    assert not selector_matches("app.kubernetes.io/component=tune-job", labels)
    assert selector_matches("app.kubernetes.io/component notin (tune-job, other)", labels)
    assert not selector_matches("app.kubernetes.io/component notin (train-job,tune-job)", labels)
    assert selector_matches("app.kubernetes.io/component notin (train-job,tune-job)", {"a": "b"})
    assert selector_matches("app.kubernetes.io/name in (gan-ray),app.kubernetes.io/component!=x", labels)
    assert not selector_matches("!app.kubernetes.io/name", labels)

    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    added = {k: v for group in kz.get("labels", []) for k, v in group["pairs"].items()}
    objects = [(f, o, {**o["metadata"].get("labels", {}), **added}) for f, o in manifests()]
    commands = kubectl_commands()
    assert commands, "no kubectl commands found"
    created_alone: set[str] = set()
    for where, argv in commands:
        for path in option(argv, "-f", "--filename"):
            target = ROOT / path
            if path == "-" or not target.resolve().is_relative_to(K8S.resolve()):
                continue
            files = [target] if target.is_file() else sorted(target.glob("*.yaml"))
            for file in files:
                images = re.findall(r"^\s*(?:-\s*)?image:\s*(\S+)", file.read_text(), flags=re.M)
                assert IMAGE not in images, \
                    f"{where}: `{shlex.join(argv)}` applies {file.name} directly, skipping kustomize's image rewrite"
        dirs = option(argv, "-k", "--kustomize")
        for d in dirs:
            if re.match(r"(https://)?github\.com/", d):  # a remote kustomization (KubeRay's own): not ours
                continue
            target = (ROOT / d).resolve()
            assert target == K8S.resolve() or (target.is_relative_to(K8S.resolve())
                                               and (target / "kustomization.yaml").is_file()), (where, argv)
            if target != K8S.resolve():  # an add-on (k8s/monitoring/): no Ray pod, so no image to rewrite
                assert IMAGE not in (target / "kustomization.yaml").read_text() + "".join(
                    p.read_text() for p in target.glob("*.yaml")), (where, argv)
        if not (dirs or option(argv, "-f", "--filename")):  # a selector on live objects (get pods -l ...)
            for selector in option(argv, "-l", "--selector"):
                resource = next((a for a in argv[2:] if a in LIVE_LABELS), "pods")
                assert any(selector_matches(selector, labels) for labels in LIVE_LABELS[resource]()), \
                    (where, resource, selector)
            continue
        for selector in option(argv, "-l", "--selector"):
            assert dirs and all((ROOT / d).resolve() == K8S.resolve() for d in dirs), \
                f"{where}: `{shlex.join(argv)}` selects without kustomize of k8s/"
            chosen = [(f, o) for f, o, labels in objects if selector_matches(selector, labels)]
            assert chosen, f"{where}: selector {selector!r} matches nothing"
            kinds = {o["kind"] for _, o in chosen}
            if kinds & {"RayJob", "RayService"}:  # a stage of GPU work: that job or the service, nothing else
                assert len(chosen) == 1, f"{where}: {selector!r} selects {[o['metadata']['name'] for _, o in chosen]}"
                if argv[1:2] in (["create"], ["apply"]):
                    created_alone.add(chosen[0][1]["metadata"]["name"])
            elif "notin" in selector:  # the base stage: everything but the jobs and the service
                assert len(chosen) == sum(o["kind"] not in ("RayJob", "RayService") for _, o, _ in objects), \
                    (where, selector)
    gpu_stages = {o["metadata"]["name"] for _, o in of_kind("RayJob") + of_kind("RayService")}
    assert created_alone == gpu_stages, created_alone


# ----------------------------------------------------------------------------------------- object store
def test_object_store_fits_in_dev_shm():
    """Ray keeps the object store in /dev/shm, here a memory-backed emptyDir with a sizeLimit. Unless told,
    Ray takes 30% of the container's memory for it, more than the volume holds, and the kubelet evicts a pod that
    writes past the limit: every Ray pod sets object-store-memory below the dshm sizeLimit (with Ray's own 5%
    wiggle room), and the volume itself fits in the container's memory limit it is charged to."""
    from ray._private import ray_constants

    count = 0
    for f, spec in cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for group, g in groups:
            pod = g["template"]["spec"]
            (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/dev/shm" in mounts, (f, group)
            (volume,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
            assert volume["emptyDir"]["medium"] == "Memory", (f, group)
            shm = quantity(volume["emptyDir"]["sizeLimit"])
            value = g["rayStartParams"].get("object-store-memory")
            assert value is not None, f"{f} {group}: no object-store-memory; Ray's default would exceed /dev/shm"
            assert re.fullmatch(r"[0-9]+", value), (f, group, value)  # bytes, as `ray start` expects
            store = int(value)
            assert ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES <= store <= 0.95 * shm, (f, group, store, shm)
            memory = quantity(container["resources"]["limits"]["memory"])
            assert shm < memory, (f, group)
            count += 1
    assert count >= 8  # head and GPU workers of the RayCluster, both RayJobs and the RayService


# ------------------------------------------------------------------------------------------- kustomize build
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) not installed")
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "StorageClass"}


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`: what `kubectl apply -k DIR` sends (offline; no cluster needed)."""
    r = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [o for o in yaml.safe_load_all(r.stdout) if o]


def built_cluster_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    for o in objects:
        spec = o.get("spec", {})
        if o["kind"] == "RayCluster":
            yield o["metadata"]["name"], spec
        elif o["kind"] == "RayJob":
            yield o["metadata"]["name"], spec["rayClusterSpec"]
        elif o["kind"] == "RayService":
            yield o["metadata"]["name"], spec["rayClusterConfig"]


@needs_kubectl
@needs_crds
def test_kustomize_build_is_what_the_docs_apply():
    """`kubectl apply -k k8s/` sends the build's output: every object in namespace gan-ray (cluster-scoped kinds
    aside), every Ray pod on the kustomization's image, and every object still valid (CRDs, core schemas)."""
    import kubernetes_validate

    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (rewrite,) = kz["images"]
    image = f"{rewrite['newName']}@{rewrite['digest']}"
    objects = kustomize(K8S)
    assert {o["kind"] for o in objects} >= {"Namespace", "PriorityClass", "PersistentVolumeClaim", "Deployment",
                                            "Service", "RayCluster", "RayJob", "RayService"}
    assert len(objects) == len(manifests())
    for o in objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gan-ray", o["metadata"]["name"]
        if o["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in o["metadata"], o["kind"]
        else:
            assert o["metadata"]["namespace"] == "gan-ray", (o["kind"], o["metadata"]["name"])
        if o["kind"] in RAY_KINDS:
            errors = list(jsonschema.Draft7Validator(crd_schema(o["kind"])).iter_errors(o))
            assert not errors, errors[0].message
        else:
            kubernetes_validate.validate(o, "1.30", strict=True)
    images = [c["image"] for _, spec in built_cluster_specs(objects)
              for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
              for c in pod["template"]["spec"]["containers"]]
    images += [c["image"] for o in objects if o["kind"] == "RayJob"
               for c in o["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    assert images and set(images) == {image}, set(images)


def gpu_groups(spec: dict) -> list[dict]:
    return [g for g in spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]


GPU_COMPONENTS = sorted(p.parent.name for p in (K8S / "gpu").glob("*/kustomization.yaml"))


@needs_kubectl
@needs_crds
@pytest.mark.parametrize("component", GPU_COMPONENTS)
def test_gpu_node_selection_components(component, tmp_path):
    """Each cloud's component (enabled as the kustomization's comment and docs/deploy.md say) pins the GPU workers
    of every cluster spec to its GPU nodes, and the result still validates against the CRDs."""
    kz_doc = yaml.safe_load((K8S / "gpu" / component / "kustomization.yaml").read_text())
    assert kz_doc["kind"] == "Component"
    assert f"gpu/{component}" in (K8S / "kustomization.yaml").read_text()
    assert f"gpu/{component}" in (ROOT / "docs" / "deploy.md").read_text()
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    kz = yaml.safe_load((copy_dir / "kustomization.yaml").read_text())
    kz["components"] = [f"gpu/{component}"]
    (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(kz))
    objects = kustomize(copy_dir)
    specs = list(built_cluster_specs(objects))
    assert len(specs) == 4
    selectors = set()
    for name, spec in specs:
        for g in gpu_groups(spec):
            selector = g["template"]["spec"].get("nodeSelector")
            assert selector and len(selector) == 1, (component, name)
            selectors.add(tuple(selector.items()))
        assert not spec["headGroupSpec"]["template"]["spec"].get("nodeSelector")  # the head stays on CPU nodes
    assert len(selectors) == 1, selectors
    for o in objects:
        if o["kind"] in RAY_KINDS:
            errors = list(jsonschema.Draft7Validator(crd_schema(o["kind"])).iter_errors(o))
            assert not errors, errors[0].message


def test_gpu_work_has_a_priority_class_below_the_systems():
    (_, pc), = of_kind("PriorityClass")
    assert pc["apiVersion"] == "scheduling.k8s.io/v1" and not pc.get("globalDefault")
    assert 0 < pc["value"] < 1_000_000_000  # user classes stay below system-cluster-critical's 2e9
    for f, spec in cluster_specs():
        for g in gpu_groups(spec):
            assert g["template"]["spec"]["priorityClassName"] == pc["metadata"]["name"], f


# ------------------------------------------------------------------------------------ the service's availability
def test_rayservice_is_highly_available():
    """What KubeRay's production samples do for a RayService: GCS fault tolerance (Redis, in this kustomization),
    at least two Serve replicas, on GPU workers kept on different nodes."""
    (_, service), = of_kind("RayService")
    spec = service["spec"]["rayClusterConfig"]
    (_, cfg), = serve_configs()
    (app,) = cfg["applications"]
    assert app["args"]["min_replicas"] >= 2
    (group,) = gpu_groups(spec)
    assert group["minReplicas"] >= 2
    pod = group["template"]["spec"]
    labels = group["template"]["metadata"]["labels"]
    by_key = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    hostname = by_key["kubernetes.io/hostname"]
    assert hostname["whenUnsatisfiable"] == "DoNotSchedule" and hostname["maxSkew"] == 1
    assert hostname["labelSelector"]["matchLabels"].items() <= labels.items()
    assert hostname["matchLabelKeys"] == ["ray.io/cluster"]  # this cluster's workers, not other clusters'
    assert "topology.kubernetes.io/zone" in by_key
    # GCS fault tolerance: the Redis of k8s/redis.yaml, with the password from the Secret it uses too
    ft = spec["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    (_, redis_svc), = [(f, o) for f, o in of_kind("Service") if o["metadata"]["name"] == host]
    assert int(port) in [p["port"] for p in redis_svc["spec"]["ports"]]
    (_, redis), = of_kind("Deployment")
    assert redis_svc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] in refs
    assert "$(REDIS_PASSWORD)" in container["args"]  # Redis really requires it
    assert "--appendonly" in container["args"]  # and keeps what the GCS wrote across its own restarts
    (_, claim), = [(f, o) for f, o in of_kind("PersistentVolumeClaim") if o["metadata"]["name"] == "gan-ray-redis"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["storageClassName"] == "gan-ray-block"
    # the documented one-time Secret names the same secret and key
    docs = (ROOT / "docs" / "deploy.md").read_text()
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert f"create secret generic {ref['name']} --from-literal={ref['key']}=" in docs


def test_redis_pod_meets_the_restricted_standard():
    (_, redis), = of_kind("Deployment")
    pod = redis["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"])
        assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-alpine)?", c["image"]), c["image"]  # pinned


# --------------------------------------------------------------------------------------------------- storage
STORAGE = K8S / "storage"
RWX_PROVISIONERS = {"efs.csi.aws.com", "filestore.csi.storage.gke.io", "file.csi.azure.com", "nfs.csi.k8s.io"}


def storage_files() -> list[Path]:
    return sorted(p for p in STORAGE.glob("*.yaml") if p.name != "chown-shared.yaml")


@pytest.mark.parametrize("path", storage_files(), ids=lambda p: p.name)
def test_each_clouds_storage_file_defines_the_classes_the_manifests_name(path):
    """One file per cloud, each defining exactly the storage classes the claims name: a ReadWriteMany one for
    the shared volume that uid 1000 can write (EFS access point uid, SMB mount options, or the documented chown
    job for NFS), and one for Redis's disk."""
    import kubernetes_validate

    classes = {o["metadata"]["name"]: o for o in yaml.safe_load_all(path.read_text()) if o}
    claimed = {o["spec"]["storageClassName"] for _, o in of_kind("PersistentVolumeClaim")}
    assert set(classes) == claimed == {"gan-ray-shared", "gan-ray-block"}
    for sc in classes.values():
        assert sc["kind"] == "StorageClass"
        kubernetes_validate.validate(sc, "1.30", strict=True)
    shared = classes["gan-ray-shared"]
    assert shared["provisioner"] in RWX_PROVISIONERS
    assert shared["reclaimPolicy"] == "Retain"  # runs and models outlive a deleted claim
    header = path.read_text()
    assert f"kubectl apply -f k8s/storage/{path.name}" in header
    if shared["provisioner"] == "efs.csi.aws.com":
        assert shared["parameters"]["provisioningMode"] == "efs-ap"
        assert (shared["parameters"]["uid"], shared["parameters"]["gid"]) == ("1000", "100")
    elif shared["provisioner"] == "file.csi.azure.com":
        assert {"uid=1000", "gid=100"} <= set(shared["mountOptions"])
    else:  # NFS: root-owned, fsGroup does not apply: the one-off chown job
        assert "k8s/storage/chown-shared.yaml" in header


def test_the_nfs_chown_job_hands_the_shared_volume_to_uid_1000():
    import kubernetes_validate

    (job,) = [o for o in yaml.safe_load_all((STORAGE / "chown-shared.yaml").read_text()) if o]
    kubernetes_validate.validate(job, "1.30", strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "chown 1000:100 /mnt/shared" in " ".join(container["command"])
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims[container["volumeMounts"][0]["name"]] == "gan-ray-shared"
    sc = container["securityContext"]
    # root, but the Baseline standard's minimum: no privilege, no escalation, only the two capabilities it needs
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    text = (STORAGE / "chown-shared.yaml").read_text()
    assert "pod-security.kubernetes.io/enforce=baseline" in text and "enforce=restricted" in text  # and restored


# ------------------------------------------------------------------------------------------------ monitoring
# The part of the Prometheus Operator's PodMonitor (monitoring.coreos.com/v1) these manifests use, with unknown
# fields rejected (the CRD is not shipped here; field names and types as in its API reference).
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
        "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "targetLabel": {"type": "string"}, "separator": {"type": "string"}, "regex": {"type": "string"},
    "replacement": {"type": "string"}, "modulus": {"type": "integer"},
    "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                        "uppercase", "keepequal", "dropequal"]}}}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          "(([0-9]+)s)?(([0-9]+)ms)?)$"}
PODMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
                 "properties": {
                     "jobLabel": {"type": "string"},
                     "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                     "selector": _LABEL_SELECTOR,
                     "sampleLimit": {"type": "integer", "minimum": 0},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["port"],
                         "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                        "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                                        "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                                        "relabelings": {"type": "array", "items": _RELABEL},
                                        "metricRelabelings": {"type": "array", "items": _RELABEL}}}}}}}}


def label_selector_matches(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values, "Exists": key in labels,
                "DoesNotExist": key not in labels}[op] is False:
            return False
    return True


def test_podmonitor_scrapes_every_ray_pod():
    """Shape (the schema above, which rejects what the operator would ignore) and meaning: it selects the head
    and GPU worker pods of every cluster spec in the namespace kustomize puts them in, and scrapes ports those
    pods name; the selector matches nothing else (not Redis, not the job submitters)."""
    validator = jsonschema.Draft7Validator(PODMONITOR_SCHEMA)
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
           "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "metrics", "intervall": "30s"}]}}
    assert list(validator.iter_errors(bad))  # the schema has teeth
    (pm,) = [o for o in yaml.safe_load_all((K8S / "monitoring" / "podmonitor.yaml").read_text()) if o]
    errors = list(validator.iter_errors(pm))
    assert not errors, errors[0].message
    kz = yaml.safe_load((K8S / "monitoring" / "kustomization.yaml").read_text())
    assert kz["namespace"] == "gan-ray" and pm["spec"]["namespaceSelector"]["matchNames"] == ["gan-ray"]
    selector = pm["spec"]["selector"]
    ports_seen: set[str] = set()
    for f, spec in cluster_specs():
        for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            labels = g["template"]["metadata"]["labels"]
            assert label_selector_matches(selector, labels), (f, labels)
            names = {p["name"] for c in g["template"]["spec"]["containers"] for p in c.get("ports", [])}
            assert "metrics" in names, (f, labels)  # Ray's metrics agent on every node
            ports_seen |= names
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports_seen
    for f, o in of_kind("RayJob"):
        assert not label_selector_matches(selector, o["spec"]["submitterPodTemplate"]["metadata"]["labels"])
    (_, redis), = of_kind("Deployment")
    assert not label_selector_matches(selector, redis["spec"]["template"]["metadata"]["labels"])


# ------------------------------------------------------------------------------------- the driver the GPUs need


def pinned_cuda_major() -> int:
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return int(pins["nvidia-cuda-runtime"].split(".")[0])


def test_the_driver_requirement_follows_the_pinned_cuda_and_is_stated():
    """torch from PyPI brings its own CUDA runtime (nvidia-cuda-runtime in constraints.txt) but uses the node's
    driver: the docs, the k8s manifests and the launcher configs state the driver that runtime needs, and the
    launcher configs' images have it."""
    import ray

    # Ray's default AMIs per region (its AWS config module imports boto3, so read them from its source)
    aws_module = Path(ray.__file__).parent / "autoscaler" / "_private" / "aws" / "config.py"
    default_amis = set(re.findall(r'"(ami-[0-9a-f]+)"', aws_module.read_text()))
    assert default_amis
    need = MIN_DRIVER[pinned_cuda_major()]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f">= {need}" in docs
    assert f">= {need}" in (K8S / "raycluster.yaml").read_text()
    gcp = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    for name, node_type in gcp["available_node_types"].items():
        for disk in node_type["node_config"]["disks"]:
            image = disk["initializeParams"]["sourceImage"]
            m = re.search(r"/family/.*-nvidia-(\d+)$", image)
            assert m and int(m.group(1)) >= need, (name, image)
    aws_text = (CLUSTER / "aws-gpu.yaml").read_text()
    aws = yaml.safe_load(aws_text)
    for name, node_type in aws["available_node_types"].items():
        image_id = node_type["node_config"].get("ImageId")
        # set on every node type: without it Ray picks its default, a CUDA 11 Deep Learning AMI
        assert image_id and image_id not in default_amis and image_id.lower() != "latest_dlami", name
        assert re.fullmatch(r"ami-[0-9a-fx]{8,17}", image_id), image_id
    assert "aws ec2 describe-images" in aws_text and "Deep Learning Base OSS Nvidia Driver GPU AMI" in aws_text
    assert f">= {need}" in aws_text and f">= {need}" in (CLUSTER / "gcp-gpu.yaml").read_text()


def test_the_bucket_mounts_allow_the_directory_renames_export_makes():
    """`export` swaps model directories by rename; gcsfuse refuses directory renames unless --rename-dir-limit
    covers the directory's objects (a model directory holds model.json, the weights and samples.png)."""
    gcp = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    mount = " ".join(c for c in gcp["initialization_commands"] if "gcsfuse" in c)
    m = re.search(r"--rename-dir-limit[= ](\d+)", mount)
    assert m and int(m.group(1)) >= 3, mount
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert any("s3fs" in c for c in aws["initialization_commands"])  # s3fs renames directories (copy + delete)


# ------------------------------------------------------------------------------------------- the operator
def test_docs_install_the_operator_version_the_manifests_are_checked_against():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "helm repo add kuberay https://ray-project.github.io/kuberay-helm/" in docs
    versions = re.findall(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)", docs)
    assert versions and set(versions) == {SHARED_CRDS.parent.name.lstrip("v")}  # the CRDs under test: v1.7.0


def test_every_ray_pod_can_pull_from_a_private_registry():
    """The image lives in the admin's registry (docs/deploy.md, step 3): every pod KubeRay creates names the pull
    secret the docs create (absent, a public image still pulls). A ServiceAccount's imagePullSecrets would not do:
    KubeRay gives an autoscaling cluster's head a ServiceAccount of its own."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    names = {tuple(s["name"] for s in pod.get("imagePullSecrets", [])) for _, _, pod in pod_templates()}
    assert len(names) == 1, names
    ((name,),) = names
    assert f"create secret docker-registry {name}" in docs


# ------------------------------------------------------------------------------- capacity (docs/deploy.md, step 0)
GIB = 2**30
MIB = 2**20
# Daemon-set requests assumed on a node (CNI, kube-proxy, CSI node plugins, device plugin, logging/metrics agents).
DAEMON_SETS = {"cpu": 0.6, "memory": 1.5 * GIB}


def gke_allocatable(cpus: int, memory_gib: float) -> dict[str, float]:
    """GKE's reservations (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes): memory 25% of the first
    4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above 128, plus 100 MiB for eviction; CPU 6% of
    the first core, 1% of the next, 0.5% of the next 2, 0.25% above 4."""
    tiers, left, reserved = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)], memory_gib, 0.0
    for size, share in tiers:
        reserved += min(left, size) * share
        left -= min(left, size)
        if left <= 0:
            break
    return {"cpu": cpus - kube_reserved_cpu(cpus), "memory": (memory_gib - reserved) * GIB - 100 * MIB}


def kube_reserved_cpu(cpus: int) -> float:
    shares = [0.06] + [0.01] + [0.005] * 2 + [0.0025] * max(cpus - 4, 0)
    return sum(shares[:cpus])


def eks_allocatable(cpus: int, memory_gib: float, max_pods: int) -> dict[str, float]:
    """The EKS-optimized AMIs' bootstrap: kube-reserved memory 255 MiB + 11 MiB per pod the node may run, 100 MiB for
    eviction; CPU as on GKE."""
    return {"cpu": cpus - kube_reserved_cpu(cpus), "memory": memory_gib * GIB - (255 + 11 * max_pods) * MIB - 100 * MIB}


GPU_NODES = {"g2-standard-8 (GKE)": gke_allocatable(8, 32), "g5.2xlarge (EKS)": eks_allocatable(8, 32, 58)}
CPU_NODES = {"n2-standard-8 (GKE)": gke_allocatable(8, 32), "m5.2xlarge (EKS)": eks_allocatable(8, 32, 58)}


def deploy_docs() -> str:
    """docs/deploy.md as one line of words: wrapped sentences and continued commands (`\\` newline) joined."""
    return " ".join((ROOT / "docs" / "deploy.md").read_text().replace("\\\n", " ").split())


def test_the_documented_allocatable_figures_follow_the_clouds_formulas():
    docs = deploy_docs()
    gke, eks = gke_allocatable(8, 32), eks_allocatable(8, 32, 58)
    assert f"**{gke['memory'] / GIB:.2f} GiB and {gke['cpu']:.2f} CPU allocatable**" in docs
    assert f"**{eks['memory'] / GIB:.1f} GiB and {eks['cpu']:.2f} CPU allocatable**" in docs
    # GKE's own worked example: a 150 GiB node reserves 9.8577 GiB with the eviction threshold, 140.1423 allocatable
    assert round(gke_allocatable(8, 150)["memory"] / GIB, 4) == 140.1423


def pod_requests(pod: dict, extra: list[dict] = ()) -> dict[str, float]:
    """What the scheduler counts for a pod: its containers' requests summed (init containers run before them)."""
    total = {"cpu": 0.0, "memory": 0.0}
    for c in pod["containers"] + list(extra):
        for key in total:
            total[key] += quantity(c["resources"]["requests"][key])
    return total


def test_gpu_workers_fit_each_node_type_with_its_reservations_and_daemon_sets():
    count = 0
    for f, spec in cluster_specs():
        for g in gpu_groups(spec):
            need = pod_requests(g["template"]["spec"])
            assert g["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "1"  # per node
            for node, allocatable in GPU_NODES.items():
                for key in need:
                    assert need[key] + DAEMON_SETS[key] <= allocatable[key], (f, node, key, need[key])
            count += 1
    assert count == 4
    # and the jobs still fit in one pod's CPUs: --cpus-per-worker of the training job
    (train,) = [argv for _, argv in entrypoint_commands() if argv[0] == "train"]
    cpus = float(train[train.index("--cpus-per-worker") + 1])
    (_, cluster), = [(f, s) for f, s in cluster_specs() if f == "raycluster.yaml"]
    (group,) = gpu_groups(cluster)
    assert cpus <= quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


def head_pod_requests(spec: dict) -> dict[str, float]:
    """A head pod's requests: the head container plus the autoscaler sidecar KubeRay adds with autoscalerOptions."""
    return pod_requests(spec["headGroupSpec"]["template"]["spec"], [spec["autoscalerOptions"]])


def documented_max(pattern: str) -> int:
    values = {int(v) for v in re.findall(pattern, deploy_docs())}
    assert len(values) == 1, (pattern, values)
    return values.pop()


def eks_config() -> dict:
    return yaml.safe_load((K8S / "eks" / "cluster.yaml").read_text())


def test_gpu_demand_fits_the_documented_pool_at_every_stage():
    """docs/deploy.md's stages, from the manifests: the jobs together (the sweep as many trials as its cluster's
    GPU workers hold, the training job its workers), then the service at its maximum plus a NewCluster upgrade's
    second cluster at its minimum. Each fits the GPU pool the GKE and EKS commands create."""
    from gan_ray.cli import build_parser

    gke_pool = documented_max(r"gpu-l4 --cluster gan-ray .*?--max-nodes (\d+)")
    (gpu_group,) = [g for g in eks_config()["managedNodeGroups"] if g["name"].startswith("gpu")]
    assert gke_pool == gpu_group["maxSize"] and gpu_group["minSize"] == 0
    per_node = 1  # nvidia.com/gpu of the node types (g2-standard-8, g5.2xlarge)

    def workers(argv: list[str]) -> float:
        from gan_ray.cli.flags import resolve_train_config

        cfg = resolve_train_config(build_parser().parse_args(argv))
        return cfg.workers * cfg.gpus_per_worker / per_node

    jobs = {o["metadata"]["name"]: o for _, o in of_kind("RayJob")}
    train_argv = [argv for f, argv in entrypoint_commands() if argv[0] == "train"][0]
    tune_spec = jobs["gan-ray-tune"]["spec"]["rayClusterSpec"]
    (tune_group,) = gpu_groups(tune_spec)
    stage_jobs = workers(train_argv) + tune_group["maxReplicas"]  # a sweep fills the largest cluster it can grow to
    (_, service), = of_kind("RayService")
    (svc_group,) = gpu_groups(service["spec"]["rayClusterConfig"])
    stage_service = svc_group["maxReplicas"] + svc_group["minReplicas"]
    assert stage_jobs <= gke_pool and stage_service <= gke_pool, (stage_jobs, stage_service, gke_pool)
    docs = deploy_docs()
    assert f"**GPU pool scales from 0 to {gke_pool} nodes**" in docs
    # all at once would not fit: the reason the docs apply in stages
    assert stage_jobs + svc_group["maxReplicas"] > gke_pool


def test_the_cpu_pool_holds_the_heads_of_each_stage():
    """Two heads (each with its autoscaler sidecar) plus the small pods per 8 vCPU / 32 GiB node; the jobs stage
    (3 heads, 2 submitters, Redis) and the service stage with an upgrade (3 heads, Redis) on two nodes, the worst
    overlap (5 heads) on the pool's maximum."""
    heads = [head_pod_requests(spec) for _, spec in cluster_specs()]
    head = {k: max(h[k] for h in heads) for k in ("cpu", "memory")}
    submitter = {k: max(pod_requests(o["spec"]["submitterPodTemplate"]["spec"])[k] for _, o in of_kind("RayJob"))
                 for k in ("cpu", "memory")}
    (_, redis), = of_kind("Deployment")
    small = {k: 2 * submitter[k] + pod_requests(redis["spec"]["template"]["spec"])[k] for k in ("cpu", "memory")}
    (cpu_group,) = [g for g in eks_config()["managedNodeGroups"] if g["name"] == "cpu"]
    assert cpu_group["maxSize"] == documented_max(r"--machine-type n2-standard-8 .*?--max-nodes (\d+)")
    for node, allocatable in CPU_NODES.items():
        room = {k: allocatable[k] - DAEMON_SETS[k] for k in allocatable}
        assert all(2 * head[k] + small[k] <= room[k] for k in room), (node, head, small, room)  # 2 heads + the rest
        assert 3 * head["cpu"] > room["cpu"]  # hence two per node
    assert -(-5 // 2) <= cpu_group["maxSize"]  # five heads at the worst overlap, two per node
    assert f"{head['cpu']:g} CPU / {head['memory'] / GIB:g} GiB a head" in deploy_docs()


def test_root_disks_are_sized_for_the_image():
    """EKS's default node volume (20 GiB) does not hold the image: every node group sets 100 GiB, as does the GKE
    command, and the docs state the measured size of the image's Python layer."""
    for group in eks_config()["managedNodeGroups"]:
        assert group["volumeSize"] >= 100, group["name"]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert docs.count("--disk-size 100") == 2
    assert re.search(r"is \d+\.\d+ GiB on disk", docs)


# ------------------------------------------------------------------------------------------------ QoS classes
def qos_class(pod: dict, extra_containers: list[dict] = ()) -> str:
    """Kubernetes' QoS class of a pod (pkg/apis/core/helper/qos): Guaranteed when every container, init containers
    included, has CPU and memory limits equal to its requests (requests default to limits); BestEffort when none sets
    any; else Burstable."""
    containers = pod["containers"] + pod.get("initContainers", []) + list(extra_containers)
    if not any(c.get("resources") for c in containers):
        return "BestEffort"
    for c in containers:
        res = c.get("resources", {})
        limits, requests = res.get("limits", {}), res.get("requests", {}) or res.get("limits", {})
        for key in ("cpu", "memory"):
            if key not in limits or quantity(requests.get(key, limits[key])) != quantity(limits[key]):
                return "Burstable"
    return "Guaranteed"


# KubeRay v1.7's worker init container (common/pod.go, DefaultWorkerPodTemplate): 200m / 256Mi, requests = limits.
KUBERAY_INIT = {"name": "wait-gcs-ready", "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                                                        "limits": {"cpu": "200m", "memory": "256Mi"}}}


def test_every_pod_is_guaranteed_as_the_docs_say():
    assert qos_class({"containers": [{"resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                                                    "limits": {"cpu": "2", "memory": "1Gi"}}}]}) == "Burstable"
    count = 0
    for f, spec in cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]
        assert qos_class(head, [{"name": "autoscaler", "resources": spec["autoscalerOptions"]["resources"]}]) \
            == "Guaranteed", (f, "head")
        for g in spec["workerGroupSpecs"]:
            assert qos_class(g["template"]["spec"], [KUBERAY_INIT]) == "Guaranteed", (f, g["groupName"])
            count += 2
    for f, o in of_kind("RayJob"):
        assert qos_class(o["spec"]["submitterPodTemplate"]["spec"]) == "Guaranteed", f
        count += 1
    for f, o in of_kind("Deployment"):
        assert qos_class(o["spec"]["template"]["spec"]) == "Guaranteed", f
        count += 1
    (job,) = [o for o in yaml.safe_load_all((STORAGE / "chown-shared.yaml").read_text()) if o]
    assert qos_class(job["spec"]["template"]["spec"]) == "Guaranteed"
    assert count == 11
    assert "every pod is in the Guaranteed QoS class" in deploy_docs()


# ----------------------------------------------------------------------------------- the service's replicas
def test_serve_replicas_one_per_gpu_worker_and_the_maximum_is_reachable():
    """max_replicas_per_node 1 (not Serve's best-effort spread) keeps two replicas off one node; with one per
    worker, Serve's max_replicas is exactly the GPU workers the group may grow to, each of which holds one."""
    from ray.serve.schema import ServeDeploySchema

    from gan_ray.serve.schema import ServeArgs

    (_, cfg), = serve_configs()
    (app,) = ServeDeploySchema.model_validate(cfg).applications
    (override,) = app.deployments
    assert override.name == "GeneratorServer" and override.max_replicas_per_node == 1
    from gan_ray.serve.deployment import GeneratorServer

    assert GeneratorServer.name == override.name  # the override names the app's real deployment
    args = ServeArgs.model_validate(app.args)
    (_, service), = of_kind("RayService")
    (group,) = gpu_groups(service["spec"]["rayClusterConfig"])
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_worker = min(override.max_replicas_per_node, int(float(limits["nvidia.com/gpu"]) // args.gpus_per_replica),
                     int(quantity(limits["cpu"]) // args.cpus_per_replica))
    assert per_worker == 1
    assert args.max_replicas == group["maxReplicas"] * per_worker  # every worker the group may add gets a replica
    assert args.min_replicas == group["minReplicas"] * per_worker >= 2


def test_disruption_budgets_cover_the_services_head_and_serve_workers_only():
    budgets = {o["metadata"]["name"]: o for _, o in of_kind("PodDisruptionBudget")}
    assert set(budgets) == {"gan-ray-serve-head", "gan-ray-serve-workers"}
    (_, service), = of_kind("RayService")
    spec = service["spec"]["rayClusterConfig"]
    head_labels = spec["headGroupSpec"]["template"]["metadata"]["labels"]
    (group,) = gpu_groups(spec)
    worker_labels = group["template"]["metadata"]["labels"]
    assert head_labels["app.kubernetes.io/instance"] == worker_labels["app.kubernetes.io/instance"] == SERVICE_INSTANCE

    def selects(budget: dict) -> list[dict]:
        return [labels for labels in pod_labels() if label_selector_matches(budget["spec"]["selector"], labels)]

    assert selects(budgets["gan-ray-serve-head"]) == [head_labels]  # not the RayCluster's or the jobs' heads
    assert selects(budgets["gan-ray-serve-workers"]) == [worker_labels]
    assert budgets["gan-ray-serve-head"]["spec"]["maxUnavailable"] == 0
    assert budgets["gan-ray-serve-workers"]["spec"]["maxUnavailable"] == 1 < group["minReplicas"]
    for budget in budgets.values():
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# -------------------------------------------------------------------------------------------------- the image
def test_the_image_is_addressed_by_digest_and_a_new_digest_upgrades_the_service(tmp_path):
    """A re-pushed tag changes no pod spec (nodes keep the old image, the RayService does not upgrade); a digest
    per build does. The kustomization pins a digest (its all-zero placeholder pulls nothing), and a new digest set
    as the docs' build step sets it changes every Ray pod's image and so the RayService's cluster spec."""
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (rewrite,) = kz["images"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", rewrite["digest"]) and "newTag" not in rewrite
    docs = (ROOT / "docs" / "deploy.md").read_text()
    build = docs[docs.index("### 3. The image"):docs.index("### 4. Storage")]
    assert "docker buildx build --platform linux/amd64" in build
    assert 'kustomize edit set image "gan-ray=${IMAGE%:*}@$DIGEST"' in build
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) not installed")

    def service_spec(digest: str) -> dict:
        copy_dir = tmp_path / digest[-4:]
        shutil.copytree(K8S, copy_dir)
        kz2 = copy.deepcopy(kz)
        kz2["images"] = [{"name": "gan-ray", "newName": "123456789012.dkr.ecr.us-west-2.amazonaws.com/gan-ray",
                          "digest": digest}]
        (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(kz2))
        objects = kustomize(copy_dir)
        images = {c["image"] for _, spec in built_cluster_specs(objects)
                  for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
        assert images == {f"123456789012.dkr.ecr.us-west-2.amazonaws.com/gan-ray@{digest}"}
        (svc,) = [o for o in objects if o["kind"] == "RayService"]
        return svc["spec"]["rayClusterConfig"]

    assert service_spec("sha256:" + "a" * 64) != service_spec("sha256:" + "b" * 64)


def test_the_documented_tag_is_one_per_build():
    """The docs' TAG line, run here in a copy of this checkout: the commit, and a dirty tree gets a tag of its own."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    (line,) = [x for x in docs.splitlines() if x.startswith("TAG=")]
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["bash", "-c", f"{line} && echo $TAG"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    head = subprocess.run([git, "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    tag = r.stdout.strip()
    dirty = subprocess.run([git, "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    assert tag == head if not dirty else re.fullmatch(rf"{head}-dirty-\d+", tag), tag
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag)  # a valid image tag


def test_the_chown_job_comes_before_anything_writes_to_the_volume():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    chown = docs.index("kubectl apply -f k8s/storage/chown-shared.yaml")
    for stage in ("kubectl create -k k8s/ -l app.kubernetes.io/component=tune-job",
                  "kubectl create -k k8s/ -l app.kubernetes.io/component=train-job",
                  "kubectl apply -k k8s/ -l app.kubernetes.io/component=serve"):
        assert chown < docs.index(stage), stage
    assert docs.index("kubectl apply -k k8s/ -l 'app.kubernetes.io/component notin") < chown  # the claim exists


def test_eks_prerequisites_are_commands():
    """The node autoscaler (and its IAM role), the device plugin and the CSI drivers' IAM roles, installed by the
    commands of docs/deploy.md and k8s/eks/cluster.yaml, not only named."""
    cfg = eks_config()
    assert cfg["apiVersion"] == "eksctl.io/v1alpha5" and cfg["kind"] == "ClusterConfig"
    assert cfg["iam"]["withOIDC"] is True
    accounts = {a["metadata"]["name"]: a for a in cfg["iam"]["serviceAccounts"]}
    assert accounts["cluster-autoscaler"]["wellKnownPolicies"] == {"autoScaler": True}
    addons = {a["name"]: a for a in cfg["addons"]}
    assert addons["aws-efs-csi-driver"]["wellKnownPolicies"] == {"efsCSIController": True}
    assert addons["aws-ebs-csi-driver"]["wellKnownPolicies"] == {"ebsCSIController": True}
    (gpu,) = [g for g in cfg["managedNodeGroups"] if g["name"].startswith("gpu")]
    assert gpu["instanceType"] == "g5.2xlarge" and gpu["propagateASGTags"] is True
    assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in gpu["taints"]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "eksctl create cluster -f k8s/eks/cluster.yaml" in docs
    assert "helm install cluster-autoscaler autoscaler/cluster-autoscaler" in docs
    assert "--set rbac.serviceAccount.name=cluster-autoscaler" in docs  # the account with the IAM role
    assert re.search(r"kubectl apply -f https://raw\.githubusercontent\.com/NVIDIA/k8s-device-plugin/v[\d.]+/", docs)


# ------------------------------------------------------------------------------- the operator's validation rules
# KubeRay v1.7.0's own admission of a spec (ray-operator/controllers/ray/utils/validation.go: ValidateRayClusterSpec,
# ValidateRayJobSpec, ValidateRayServiceSpec and the metadata rules), for the fields these manifests use; the
# operator rejects a spec that breaks one with an event and never reconciles it. The CRD schemas do not express
# these rules. Rules about fields the manifests never set (TLS, network policy, history server, suspend, cluster
# selectors, deletion rules, K8s token auth) are left out; the CEL test above keeps most of those fields unused.
def operator_cluster_spec_errors(spec: dict, annotations: dict | None = None) -> list[str]:
    annotations = annotations or {}
    errors = []
    head = spec["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        return ["headGroupSpec should have at least one container"]
    head_env = {e["name"]: e for e in head["template"]["spec"]["containers"][0].get("env", [])}
    autoscaling = spec.get("enableInTreeAutoscaling") is True
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    groups = [("Head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, g in groups:
        params = g.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errors.append(f"{name}: resources in both rayStartParams and Resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported")
    for g in spec.get("workerGroupSpecs", []):
        name = g["groupName"]
        if not g["template"]["spec"].get("containers"):
            errors.append(f"{name}: no container")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{name}: minReplicas and maxReplicas required without autoscaling")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            errors.append(f"{name}: negative replicas")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        timeout = g.get("idleTimeoutSeconds")
        if timeout is not None and (timeout < 0 or not (v2 or head_env.get("RAY_enable_autoscaler_v2", {})
                                                          .get("value") in ("1", "true"))):
            errors.append(f"{name}: idleTimeoutSeconds needs autoscaler v2 and >= 0")
        if autoscaling and v2 and g["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
    if autoscaling and v2 and head["template"]["spec"].get("restartPolicy", "Never") != "Never":
        errors.append("head: restartPolicy must be Never or unset with autoscaler v2")
    if autoscaling and spec.get("autoscalerOptions", {}).get("version") and "RAY_enable_autoscaler_v2" in head_env:
        errors.append("both autoscalerOptions.version and RAY_enable_autoscaler_v2 set")
    ft = spec.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft is not None:
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions both set")
    if ft is None and not str(annotations.get("ray.io/ft-enabled", "")).lower() == "true" \
            and "RAY_REDIS_ADDRESS" in head_env:
        errors.append("RAY_REDIS_ADDRESS without GcsFaultToleranceOptions")
    if ft is not None:
        if head.get("rayStartParams", {}).get("redis-password"):
            errors.append("redis-password in rayStartParams with GcsFaultToleranceOptions")
        if "REDIS_PASSWORD" in head_env or "RAY_REDIS_ADDRESS" in head_env:
            errors.append("REDIS_PASSWORD / RAY_REDIS_ADDRESS env with GcsFaultToleranceOptions")
        if ft.get("backend", "redis") == "redis" and ft.get("storage") is not None:
            errors.append("GcsFaultToleranceOptions.storage with the redis backend")
    if (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds < 0")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = tuple(int(x) for x in str(spec.get("rayVersion", "0")).split(".")[:3])
        if version < (2, 52, 0):
            errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return errors


def operator_errors(obj: dict) -> list[str]:
    """What KubeRay v1.7.0 refuses in one RayCluster, RayJob or RayService (with its metadata rules)."""
    name, kind, spec = obj["metadata"]["name"], obj["kind"], obj["spec"]
    limit = {"RayCluster": 53, "RayJob": 47, "RayService": 47}[kind]
    errors = [] if len(name) <= limit and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) else [f"name {name}"]
    annotations = obj["metadata"].get("annotations")
    if kind == "RayCluster":
        errors += operator_cluster_spec_errors(spec, annotations)
        if spec.get("upgradeStrategy", {}).get("type") not in (None, "Recreate", "None"):
            errors.append("RayCluster upgradeStrategy")
    elif kind == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("ttlSecondsAfterFinished < 0")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
        if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
            errors.append("one of rayClusterSpec or clusterSelector")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            errors.append("backoffLimit with InteractiveMode")
        if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
            errors.append("SidecarMode with a submitter")
        if "rayClusterSpec" in spec:
            errors += operator_cluster_spec_errors(spec["rayClusterSpec"], annotations)
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and spec[key] <= 0:
                errors.append(f"{key} <= 0")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("backoffLimit < 0")
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")  # the operator unmarshals it
    else:
        errors += operator_cluster_spec_errors(spec["rayClusterConfig"], annotations)
        if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            errors.append("headService name set")
        if spec.get("upgradeStrategy", {}).get("type") not in (None, "None", "NewCluster",
                                                                 "NewClusterWithIncrementalUpgrade"):
            errors.append("upgradeStrategy type")
        if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
            errors.append("rayClusterDeletionDelaySeconds < 0")
    return errors


@pytest.mark.parametrize("name,obj", [m for m in manifests() if m[1]["kind"] in RAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v.get("metadata", {}).get("name"))
def test_the_operator_accepts_every_ray_object(name, obj):
    assert operator_errors(obj) == [], name


def test_the_operator_rules_have_teeth():
    (_, cluster), = of_kind("RayCluster")
    (_, service), = of_kind("RayService")
    (_, job), = [(f, o) for f, o in of_kind("RayJob") if o["metadata"]["name"] == "gan-ray-train"]
    breaks = [
        (cluster, lambda o: o["spec"]["workerGroupSpecs"][0].__setitem__("minReplicas", 5)),
        (cluster, lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"].__setitem__("restartPolicy",
                                                                                               "Always")),
        (cluster, lambda o: o["spec"]["autoscalerOptions"].__setitem__("version", "v1")),  # idleTimeoutSeconds
        (cluster, lambda o: o["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("labels", "a=b")),
        (service, lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
         .setdefault("env", []).append({"name": "REDIS_PASSWORD", "value": "x"})),
        (service, lambda o: o["spec"]["upgradeStrategy"].__setitem__("type", "Blue")),
        (job, lambda o: o["spec"].__setitem__("shutdownAfterJobFinishes", False)),
        (job, lambda o: o["metadata"].__setitem__("name", "x" * 48)),
    ]
    for obj, mutate in breaks:
        bad = copy.deepcopy(obj)
        mutate(bad)
        assert operator_errors(bad), mutate
