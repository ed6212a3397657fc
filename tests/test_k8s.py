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
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

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
IMAGE = "gan-ray:0.1.0"


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


def test_cluster_spec_is_the_same_everywhere():
    """One cluster design: the RayJobs and the RayService embed the RayCluster's spec unchanged."""
    specs = list(cluster_specs())
    (_, reference), = [(f, s) for f, s in specs if f == "raycluster.yaml"]
    for f, spec in specs:
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
    (_, pvc), = of_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
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

    for f, group, pod in pod_templates():
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{group}-pod"}, "spec": pod}
        kubernetes_validate.validate(obj, "1.30", strict=True)


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
    sources += [(f"k8s/{p.name}", "\n".join(line for line in p.read_text().splitlines()
                                             if line.lstrip().startswith("#")))
                for p in sorted(K8S.glob("*.yaml"))]
    out = []
    for where, text in sources:
        for m in re.finditer(r"\bkubectl\s[^`|;&#\n]*", text):
            out.append((where, shlex.split(m.group(0))))
    return out


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
            assert (ROOT / d).resolve() == K8S.resolve(), (where, argv)
        for selector in option(argv, "-l", "--selector"):
            assert dirs, f"{where}: `{shlex.join(argv)}` selects without kustomize"
            chosen = [(f, o) for f, o, labels in objects if selector_matches(selector, labels)]
            assert chosen, f"{where}: selector {selector!r} matches nothing"
            kinds = {o["kind"] for _, o in chosen}
            if "RayJob" in kinds:  # a job on demand: that job and nothing else
                assert len(chosen) == 1, f"{where}: {selector!r} selects {[o['metadata']['name'] for _, o in chosen]}"
                if argv[1:2] == ["create"]:
                    created_alone.add(chosen[0][1]["metadata"]["name"])
            else:  # the rest without the jobs: everything that is not a RayJob
                assert len(chosen) == sum(o["kind"] != "RayJob" for _, o, _ in objects), (where, selector)
    assert created_alone == {o["metadata"]["name"] for _, o in of_kind("RayJob")}, created_alone


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
