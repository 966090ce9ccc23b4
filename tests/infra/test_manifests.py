"""The cluster side (infra/): every manifest parses, names what exists and asks for what its config needs.

Fast and offline: YAML and text only, plus the project's own config loaders. Checks
- every YAML file under infra/ parses (Kubernetes files as several documents, each with kind and name);
- every `python -m MODULE` of a RayJob (or a RayCluster's `mvar/entrypoint` annotation: what it is sized
  for) names a module of this repository, and every `--config FILE`
  (a sweep's study file and its base config) names a file that loads with the project's loaders;
- a RayJob's worker groups hold the config's Ray Train workers (GPUs and CPUs per worker, all
  workers at once; for a sweep, one trial's training and its sampling workers), the head runs
  none, the configs' absolute paths are mounted in every pod,
  MLFLOW_TRACKING_URI points at the MLflow Service, and the image has the entrypoint's code;
- Ray token authentication on every Ray container and RayJob submitter (one Secret key for all), so the
  dashboard on the pod network answers no request without the token; every RayJob retries
  (`backoffLimit`) and has a deadline (`activeDeadlineSeconds`); specs name only fields of KubeRay's CRDs;
- the Ray cluster launcher's 8-GPU worker node type holds every 8-GPU config of workflows/configs;
- Ray versions (images, rayVersion) match the project's pin;
- no literal secret anywhere under infra/; every Secret a manifest reads is documented;
- the compose file publishes ports on 127.0.0.1 only and mounts files that exist;
- kustomization.yaml names files that exist and generates every ConfigMap the manifests read.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
CLUSTER = INFRA / "cluster"
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".env", ".sh", ".md", "")
                    or p.name == "Dockerfile")
CONFIG_LOADERS = {"workflows.train": "load_train_config", "workflows.train_tokenizer": "load_tokenizer_train_config"}
PATH_KEYS = ("tokenizer", "init_from", "output", "data.shards", "data.eval_shards", "run.storage_path")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in load_docs(p) if isinstance(d, dict) and "apiVersion" in d and "kind" in d]


def objects_of(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_objects() if d["kind"] == kind]


def ray_pin() -> str:
    match = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins no ray version"
    return match.group(1)


def quantity(value) -> float:
    """A Kubernetes CPU / count quantity ('88', '500m', 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# -- entrypoints -------------------------------------------------------------------------------

def python_modules(command: str) -> list[tuple[str, list[str]]]:
    """(module, its arguments) of every `python -m MODULE ...` in a shell command line."""
    out = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        for i, word in enumerate(words[:-2]):
            if re.fullmatch(r"python[\d.]*", Path(word).name) and words[i + 1] == "-m":
                out.append((words[i + 2], words[i + 3:]))
    return out


def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def load_config(module: str, path: str):
    from mvar import training
    from mvar.training import tokenizer_config
    loader = CONFIG_LOADERS[module]
    fn = getattr(training, loader, None) or getattr(tokenizer_config, loader)
    return fn(REPO / path)


def rayjobs() -> list[tuple[Path, dict]]:
    return objects_of("RayJob")


def rayjob_ids() -> list[str]:
    return [f"{rel(p)}:{d['metadata']['name']}" for p, d in rayjobs()]


def ray_objects() -> list[tuple[Path, dict]]:
    """RayJobs and standalone RayClusters: what KubeRay turns into Ray clusters."""
    return objects_of("RayJob") + objects_of("RayCluster")


def ray_ids() -> list[str]:
    return [f"{rel(p)}:{d['metadata']['name']}" for p, d in ray_objects()]


ENTRYPOINT_ANNOTATION = "mvar/entrypoint"  # a standalone RayCluster: the command it is sized for


def entrypoint_text(obj: dict) -> str:
    if obj["kind"] == "RayJob":
        return obj["spec"]["entrypoint"]
    text = (obj["metadata"].get("annotations") or {}).get(ENTRYPOINT_ANNOTATION, "")
    assert text, f"RayCluster {obj['metadata']['name']}: no {ENTRYPOINT_ANNOTATION} annotation (what it runs)"
    return text


def entrypoint(job: dict) -> tuple[str, list[str]]:
    found = python_modules(entrypoint_text(job))
    assert len(found) == 1, f"entrypoint should run one `python -m MODULE`: {entrypoint_text(job)!r}"
    return found[0]


def cluster_spec(obj: dict) -> dict:
    """The RayClusterSpec of a RayJob or a RayCluster."""
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


@dataclass
class JobNeeds:
    """What a RayJob's entrypoint runs: the files it reads, the worker sets it starts, the paths it uses."""
    files: list[str]                                    # repository-relative: configs, study files
    worker_sets: list[tuple[str, object]] = field(default_factory=list)   # (what, scaling-like) run one at a time
    paths: list[str] = field(default_factory=list)      # absolute paths that every pod must see


def job_needs(job: dict) -> JobNeeds:
    module, args = entrypoint(job)
    config = option(args, "--config")
    if module in CONFIG_LOADERS and config:
        cfg = load_config(module, config)
        return JobNeeds([config], [(f"{config} (training)", cfg.scaling)], config_paths(cfg))
    if module == "sweeps.run":
        return sweep_needs(next(a for a in args if a.endswith((".yaml", ".yml"))))
    return JobNeeds([a for a in args if a.endswith((".yaml", ".yml"))])


def sweep_needs(study_file: str) -> JobNeeds:
    """A sweep's trials: the base config's training workers, then the evaluation's sampling workers."""
    from mvar.config import flatten
    from mvar.training import load_train_config
    from sweeps.study import load_study
    study = load_study(REPO / study_file)
    cfg = load_train_config(REPO / study.base_config, [f"{k}={v}" for k, v in study.overrides.items()])
    ev = study.eval
    sampling = SimpleNamespace(num_workers=int(ev.get("num_workers", 1)), use_gpu=bool(ev.get("use_gpu", False)),
                               cpus_per_worker=float(ev.get("cpus_per_worker", 1.0)), gpus_per_worker=1.0)
    eval_paths = [str(v) for v in flatten(ev).values() if str(v).startswith("/")]
    log_dir = [study.log_dir] if study.log_dir.startswith("/") else []
    return JobNeeds([study_file, study.base_config],
                    [(f"{study.base_config} (trial training)", cfg.scaling), (f"{study_file} eval (trial sampling)", sampling)],
                    config_paths(cfg) + eval_paths + log_dir)


# -- pods -------------------------------------------------------------------------------------

def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def ray_resources(group: dict) -> tuple[float, float]:
    """(CPU, GPU) that Ray schedules on one pod of a head or worker group."""
    params = group.get("rayStartParams") or {}
    limits = (ray_container(group).get("resources") or {}).get("limits") or {}
    cpu = quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpu = quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpu, gpu


def bundles(cpu: float, gpu: float, scaling) -> int:
    """How many Ray Train workers of ``scaling`` fit on a node with ``cpu`` CPUs and ``gpu`` GPUs."""
    fit = math.floor(cpu / scaling.cpus_per_worker + 1e-9)
    if scaling.use_gpu:
        fit = min(fit, math.floor(gpu / scaling.gpus_per_worker + 1e-9))
    return fit


def groups(job: dict) -> list[dict]:
    spec = cluster_spec(job)
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def config_paths(cfg) -> list[str]:
    from mvar.config import flatten
    flat = flatten(cfg)
    return [str(flat[k]) for k in PATH_KEYS if str(flat.get(k) or "").startswith("/")]


def dockerfile_workdir_and_copies(path: Path) -> tuple[str, list[str]]:
    workdir, copies = "", []
    for line in path.read_text().splitlines():
        words = line.split()
        if words[:1] == ["WORKDIR"]:
            workdir = words[1]
        if words[:1] == ["COPY"]:
            copies += [w for w in words[1:-1] if not w.startswith("--")]
    return workdir, copies


# == tests ======================================================================================

def test_infra_has_the_cluster_side():
    expected = ["ray-cluster.yaml", "kuberay/rayjob-train.yaml", "mlflow/mlflow.yaml", "mlflow/docker-compose.yaml",
                "postgres/postgres.yaml", "postgres/init-databases.sh", "kustomization.yaml", "secrets.example.env"]
    assert not [f for f in expected if not (CLUSTER / f).is_file()]
    assert (INFRA / "README.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
        if "apiVersion" in doc:  # a Kubernetes object
            assert doc.get("kind"), f"{rel(path)}: object without kind"
            if doc["kind"] != "Kustomization":
                assert (doc.get("metadata") or {}).get("name"), f"{rel(path)}: {doc['kind']} without metadata.name"


def test_there_is_a_training_rayjob():
    assert any(entrypoint(job)[0] == "workflows.train" for _, job in rayjobs())


@pytest.mark.parametrize("job", [d for _, d in ray_objects()], ids=ray_ids())
def test_rayjob_entrypoint_names_existing_module_and_files(job):
    module, _ = entrypoint(job)
    assert module_file(module), f"`python -m {module}`: no {module.replace('.', '/')}.py in the repository"
    needs = job_needs(job)  # loads every config and study file with the project's loaders (ConfigError names the key)
    missing = [f for f in needs.files if not (REPO / f).is_file()]
    assert not missing, f"the entrypoint names files that do not exist: {missing}"


@pytest.mark.parametrize("job", [d for _, d in ray_objects()], ids=ray_ids())
def test_rayjob_worker_groups_hold_the_config(job):
    needs = job_needs(job)
    if not needs.worker_sets:
        pytest.skip("the entrypoint starts no Ray workers of a config")
    head, *workers = groups(job)
    assert workers, "no worker group"
    assert ray_resources(head)[0] == 0, "the head should run no training workers (rayStartParams num-cpus: '0')"
    for what, s in needs.worker_sets:
        fit = sum(bundles(*ray_resources(g), s) * int(g.get("replicas", 1)) for g in workers)
        need = f"{s.num_workers} workers x ({s.cpus_per_worker:g} CPU" + (f" + {s.gpus_per_worker:g} GPU)" if s.use_gpu else ")")
        assert fit >= s.num_workers, f"{what} needs {need}; the worker groups hold {fit}"
    for g in workers:
        assert int(g.get("maxReplicas", g.get("replicas", 1))) >= int(g.get("replicas", 1)) >= int(g.get("minReplicas", 0))
        res = ray_container(g).get("resources") or {}
        # Kubernetes schedules extended resources only with requests == limits
        assert (res.get("requests") or {}).get("nvidia.com/gpu") == (res.get("limits") or {}).get("nvidia.com/gpu")


@pytest.mark.parametrize("job", [d for _, d in ray_objects()], ids=ray_ids())
def test_rayjob_pods_mount_the_config_paths(job):
    needs = job_needs(job)
    if not needs.paths:
        pytest.skip("the entrypoint's configs name no absolute path")
    claims = {d["metadata"]["name"] for _, d in objects_of("PersistentVolumeClaim")}
    for g in groups(job):
        volumes = {v["name"]: v for v in g["template"]["spec"].get("volumes", [])}
        mounts = ray_container(g).get("volumeMounts", [])
        for p in needs.paths:
            assert any(p == m["mountPath"] or p.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), (
                f"{p} (from {needs.files}) is not under a volumeMount of {ray_container(g)['name']}")
        for m in mounts:
            claim = (volumes[m["name"]].get("persistentVolumeClaim") or {}).get("claimName")
            assert claim is None or claim in claims, f"PVC {claim} is not defined under infra/"


@pytest.mark.parametrize("job", [d for _, d in ray_objects()], ids=ray_ids())
def test_rayjob_tracks_to_the_mlflow_service(job):
    services = {(d["metadata"]["name"], p["port"]) for _, d in objects_of("Service") for p in d["spec"]["ports"]}
    for g in groups(job):
        env = {e["name"]: e for e in ray_container(g).get("env", [])}
        uri = env.get("MLFLOW_TRACKING_URI", {}).get("value", "")
        match = re.fullmatch(r"http://([\w-]+)(?:\.[\w.-]+)?:(\d+)", uri)
        assert match, f"{ray_container(g)['name']}: MLFLOW_TRACKING_URI should be http://SERVICE:PORT, got {uri!r}"
        assert (match.group(1), int(match.group(2))) in services, f"no Service {match.group(1)}:{match.group(2)} under infra/"


@pytest.mark.parametrize("job", [d for _, d in ray_objects()], ids=ray_ids())
def test_rayjob_image_holds_the_entrypoint(job):
    assert cluster_spec(job)["rayVersion"] == ray_pin()
    workdir, copies = dockerfile_workdir_and_copies(CLUSTER / "Dockerfile")
    assert not [c for c in copies if not (REPO / c).exists()], "the Dockerfile copies files that do not exist"
    module, _ = entrypoint(job)
    needed = {module.split(".")[0], *(f.split("/")[0] for f in job_needs(job).files)}
    assert needed <= {c.rstrip("/") for c in copies}, f"the image lacks {needed - set(copies)}"
    for g in groups(job):
        assert ray_container(g).get("workingDir") == workdir, "relative paths of the entrypoint resolve in workingDir"


# -- KubeRay: authentication, retries, deadline, CRD fields -------------------------------------

# The fields of KubeRay's CRDs (ray.io/v1, KubeRay 1.2 and later) that a spec may name: a misspelt
# one (`backOffLimit`) would be dropped by the API server without a word
RAYJOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                      "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                      "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                      "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC_FIELDS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                          "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                          "gcsFaultToleranceOptions", "authOptions"}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                       "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}


def submitter(job: dict) -> dict | None:
    """The submitter container of a RayJob in K8sJobMode (KubeRay's default mode), else None."""
    if job["kind"] != "RayJob" or job["spec"].get("submissionMode", "K8sJobMode") != "K8sJobMode":
        return None
    template = job["spec"].get("submitterPodTemplate")
    assert template, "K8sJobMode: the submitter runs `ray job submit` and needs the token (submitterPodTemplate)"
    return template["spec"]["containers"][0]


def auth_of(container: dict) -> tuple[str, tuple[str, str] | None]:
    """(RAY_AUTH_MODE's value, the (Secret, key) RAY_AUTH_TOKEN comes from) of a container."""
    env = {e["name"]: e for e in container.get("env", [])}
    mode = str(env.get("RAY_AUTH_MODE", {}).get("value", ""))
    token = env.get("RAY_AUTH_TOKEN", {})
    ref = (token.get("valueFrom") or {}).get("secretKeyRef")
    return mode, ((ref["name"], ref["key"]) if ref and "value" not in token else None)


@pytest.mark.parametrize("job", [d for _, d in ray_objects()], ids=ray_ids())
def test_ray_token_authentication_everywhere(job):
    containers = [ray_container(g) for g in groups(job)]
    sub = submitter(job)
    containers += [sub] if sub else []
    found = {c["name"]: auth_of(c) for c in containers}
    off = [name for name, (mode, ref) in found.items() if mode != "token" or ref is None]
    assert not off, (f"{off}: Ray token authentication needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a "
                     f"secretKeyRef in every Ray container and the submitter")
    assert len({ref for _, ref in found.values()}) == 1, f"head, workers and submitter must share one token: {found}"
    head = groups(job)[0]  # the dashboard stays on the pod network: a port-forward reaches it, nothing outside
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    if sub:
        assert sub["image"] == ray_container(head)["image"], "the submitter needs the image's Ray version"
        assert job["spec"]["submitterPodTemplate"]["spec"].get("restartPolicy") == "Never"


def test_the_token_check_catches_a_literal_and_a_missing_token():
    literal = {"name": "c", "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                                    {"name": "RAY_AUTH_TOKEN", "value": "abc"}]}
    assert auth_of(literal) == ("token", None)
    assert auth_of({"name": "c", "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]}) == ("disabled", None)
    ref = {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mvar-ray", "key": "RAY_AUTH_TOKEN"}}}
    assert auth_of({"name": "c", "env": [{"name": "RAY_AUTH_MODE", "value": "token"}, ref]}) == (
        "token", ("mvar-ray", "RAY_AUTH_TOKEN"))


@pytest.mark.parametrize("job", [d for _, d in rayjobs()], ids=rayjob_ids())
def test_rayjob_retries_and_has_a_deadline(job):
    spec = job["spec"]
    backoff, deadline = spec.get("backoffLimit"), spec.get("activeDeadlineSeconds")
    assert isinstance(backoff, int) and backoff >= 1, "backoffLimit: a retry resumes from the checkpoint, set >= 1"
    assert isinstance(deadline, int) and deadline >= 3600, "activeDeadlineSeconds: a positive bound of an hour or more"
    assert spec.get("shutdownAfterJobFinishes") is True, "the cluster (and its GPUs) must go when the job ends"


@pytest.mark.parametrize("job", [d for _, d in ray_objects()], ids=ray_ids())
def test_ray_specs_name_only_crd_fields(job):
    if job["kind"] == "RayJob":
        unknown = set(job["spec"]) - RAYJOB_SPEC_FIELDS
        assert not unknown, f"not RayJobSpec fields: {unknown}"
    spec = cluster_spec(job)
    assert not set(spec) - RAYCLUSTER_SPEC_FIELDS, f"not RayClusterSpec fields: {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
    head, *workers = groups(job)
    assert not set(head) - HEAD_GROUP_FIELDS, f"not HeadGroupSpec fields: {set(head) - HEAD_GROUP_FIELDS}"
    for g in workers:
        assert not set(g) - WORKER_GROUP_FIELDS, f"not WorkerGroupSpec fields: {set(g) - WORKER_GROUP_FIELDS}"
        assert g.get("groupName"), "a worker group without groupName"


def test_there_is_a_standalone_cluster_for_sweeps():
    clusters = [d for _, d in objects_of("RayCluster")]
    assert any(entrypoint(c)[0] == "sweeps.run" for c in clusters), "no RayCluster sized for a sweep (sweeps.run)"


def test_launcher_worker_node_holds_every_gpu_config():
    launcher = load_docs(CLUSTER / "ray-cluster.yaml")[0]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    gpu_types = {n: t for n, t in types.items() if (t.get("resources") or {}).get("GPU", 0) >= 8}
    assert gpu_types, "no node type with GPU: 8"
    assert launcher["max_workers"] >= max(t.get("max_workers", 0) for t in gpu_types.values()) >= 1
    configs = sorted((REPO / "workflows" / "configs").glob("*.yaml"))
    gpu_configs = [(c, load_config(m, rel(c))) for c in configs
                   for m in [("workflows.train_tokenizer" if c.name.startswith("tokenizer") else "workflows.train")]]
    gpu_configs = [(c, cfg) for c, cfg in gpu_configs if cfg.scaling.use_gpu]
    assert gpu_configs, "no GPU config in workflows/configs"
    for c, cfg in gpu_configs:
        fits = [bundles(t["resources"].get("CPU", 0), t["resources"]["GPU"], cfg.scaling)
                * min(t.get("max_workers", 0), launcher["max_workers"]) for t in gpu_types.values()]
        assert max(fits) >= cfg.scaling.num_workers, f"{rel(c)}: no worker node type holds its {cfg.scaling.num_workers} workers"


def test_launcher_matches_the_ray_pin_and_keeps_the_dashboard_on_loopback():
    launcher = load_docs(CLUSTER / "ray-cluster.yaml")[0]
    assert launcher["docker"]["image"].split(":")[1].startswith(ray_pin() + "-")
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    mounted = set(launcher["file_mounts"])
    for cmd in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        for sourced in re.findall(r"\. (\S+)", cmd):
            assert sourced in mounted, f"{sourced} is sourced but not in file_mounts"


def test_ray_images_match_the_pin():
    for path in TEXT_FILES:
        for tag in re.findall(r"rayproject/ray:([\w.-]+)", path.read_text()):
            assert tag.startswith(ray_pin() + "-"), f"{rel(path)}: rayproject/ray:{tag}, but pyproject pins ray {ray_pin()}"


# -- secrets ------------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_key)(?!\w*_(path|file)\b)")
# a value that says where the secret comes from (${VAR}, $(VAR), $VAR, :'psql_var', secretKeyRef),
# or a stand-in that is obviously not one (..., <...>)
NOT_A_SECRET = re.compile(r"""^(\$|:|\.\.\.|<[^>]*>|\{?secretKeyRef)""")
ASSIGNMENT = re.compile(r"""([\w.-]*)["']?=["']?([^\s"'#,}]*)""")            # NAME=value (env, shell, prose)
YAML_PAIR = re.compile(r"""([\w.-]*)["']?\s*:\s+["']?([^\s"'#,}]*)""")     # NAME: value (YAML code)
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")


def literal_secrets(text: str, yaml_code: bool = True) -> list[str]:
    """Lines that give a secret-like name a literal value, or a URL a literal password."""
    found = []
    for line in text.splitlines():
        code = "" if line.lstrip().startswith("#") else line.split(" #")[0]
        pairs = [*ASSIGNMENT.findall(line), *(YAML_PAIR.findall(code) if yaml_code else [])]
        named = any(SECRET_NAME.search(name) and value and not NOT_A_SECRET.match(value) for name, value in pairs)
        in_url = any(not NOT_A_SECRET.match(pw) for pw in URL_CREDENTIALS.findall(line))
        if named or in_url:
            found.append(line.strip())
    return found


def test_the_secret_scan_catches_literals():
    assert literal_secrets("POSTGRES_PASSWORD: hunter2")
    assert literal_secrets("  password=s3cr3t")
    assert literal_secrets("url: postgresql://optuna:hunter2@db/optuna")
    assert not literal_secrets("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")
    assert not literal_secrets("MLFLOW_DB_PASSWORD=")
    assert not literal_secrets("valueFrom: {secretKeyRef: {name: mvar-db, key: MLFLOW_DB_PASSWORD}}")
    assert not literal_secrets("postgresql+psycopg2://$OPTUNA_DB_USER:$OPTUNA_DB_PASSWORD@postgres/optuna")
    assert not literal_secrets("ALTER ROLE mlflow WITH LOGIN PASSWORD :'mlflow_password';")
    assert not literal_secrets("export RAY_AUTH_TOKEN_PATH=/abs/out/stack/ray_auth_token")
    assert not literal_secrets("# the token (PGPASSWORD: never in a URL)")


@pytest.mark.parametrize("path", TEXT_FILES, ids=rel)
def test_no_literal_secrets(path):
    found = literal_secrets(path.read_text(), yaml_code=path.suffix in (".yaml", ".yml"))
    assert not found, f"{rel(path)}: literal secrets: {found}"


def env_entries() -> list[tuple[Path, dict]]:
    out = []

    def walk(path, node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "env" and isinstance(v, list):
                    out.extend((path, e) for e in v if isinstance(e, dict) and "name" in e)
                walk(path, v)
        elif isinstance(node, list):
            for v in node:
                walk(path, v)
    for path, obj in k8s_objects():
        walk(path, obj)
    return out


def test_kubernetes_secrets_come_from_secret_refs_and_are_documented():
    example = (CLUSTER / "secrets.example.env").read_text()
    readme = (INFRA / "README.md").read_text()
    refs = set()
    for path, e in env_entries():
        if SECRET_NAME.search(e["name"]) or e["name"].startswith("AWS_"):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            assert ref and "value" not in e, f"{rel(path)}: env {e['name']} must come from a secretKeyRef"
            refs.add((ref["name"], ref["key"]))
    assert refs, "no secretKeyRef under infra/"
    for name, key in sorted(refs):
        assert re.search(rf"(?m)^{key}=$", example), f"{key} (Secret {name}) is not listed in secrets.example.env"
        assert name in readme, f"Secret {name} is not explained in infra/README.md"


def test_secrets_example_has_names_only():
    for line in (CLUSTER / "secrets.example.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=", line.strip()), f"secrets.example.env: {line!r} should be NAME= (empty)"


# -- compose and kustomize ---------------------------------------------------------------------

def compose_files() -> list[Path]:
    return [p for p in YAML_FILES if "services" in (load_docs(p)[0] or {}) and "apiVersion" not in load_docs(p)[0]]


@pytest.mark.parametrize("path", compose_files(), ids=rel)
def test_compose_publishes_on_loopback_only_and_mounts_existing_files(path):
    services = load_docs(path)[0]["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: port '{port}' is not bound to 127.0.0.1"
        for vol in svc.get("volumes", []):
            source = str(vol).split(":")[0]
            if source.startswith((".", "/")):
                assert (path.parent / source).exists(), f"{name}: mounts {source}, which does not exist"
        if "build" in svc:
            assert (path.parent / str(svc["build"]) / "Dockerfile").is_file()
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key.startswith("AWS_"):
                assert str(value).startswith("${"), f"{name}: {key} must come from the environment (${{...}})"


def test_kustomization_names_existing_files_and_every_configmap_read():
    kust = load_docs(CLUSTER / "kustomization.yaml")[0]
    missing = [r for r in kust["resources"] if not (CLUSTER / r).is_file()]
    missing += [f for g in kust.get("configMapGenerator", []) for f in g.get("files", []) if not (CLUSTER / f).is_file()]
    assert not missing, f"kustomization.yaml names missing files: {missing}"
    generated = {g["name"] for g in kust.get("configMapGenerator", [])}
    read = set(re.findall(r"configMap(?:Ref)?:\s*\{\s*name:\s*([\w-]+)",
                          "\n".join((CLUSTER / r).read_text() for r in kust["resources"])))
    assert read and read <= generated, f"ConfigMaps read but not generated: {read - generated}"
