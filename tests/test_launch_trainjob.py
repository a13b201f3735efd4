"""``render trainjob``: a Kubeflow Trainer v2 TrainJob and its TrainingRuntime, valid against Trainer's own CRDs.

The schemas are the v2.3.0 release's CRDs, copied into ``tests/fixtures/kubeflow_trainer/`` (its README says
from where). Validation is strict: every object in the CRD's ``openAPIV3Schema`` that lists its properties
accepts no other field, as the API server's strict field validation (``kubectl apply`` by default) refuses
them. The CRDs' CEL rules (``x-kubernetes-validations``) that apply on create are evaluated here by hand; a
rule this file does not know fails the test, so a newer CRD cannot slip one past. The pods and Jobs inside
the runtime are also checked against the core Kubernetes schemas (kubernetes-validate, strict).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kolors_job.core.errors import ExitCode
from kolors_job.launch import k8s, pod, register_cli, trainer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "kubeflow_trainer"
K8S_VERSION = kubernetes_validate.utils.latest_version()


def opts(**kw: Any) -> pod.RenderOptions:
    base: dict[str, Any] = {"job_id": "t-1", "image": "registry.example/kolors-job:1", "manifest_uri": "s3://b/m.yaml"}
    base.update(kw)
    return pod.RenderOptions(**base)


VARIANTS = {
    "1x1": opts(),
    "1x4-secret-emptydir": opts(gpus=4, secret="creds", cache_pvc=None, node_selector={"gpu": "a100"}),
    "2x8-irsa-nas": opts(nodes=2, gpus=8, irsa_role_arn="arn:aws:iam::1:role/r", create_cache_pvc="1Ti",
                         storage_class="nas", namespace="ml"),
    "3x1-ack-oss": opts(nodes=3, manifest_uri="oss://b/m.yaml", oss_region="cn-beijing", rrsa_role_name="k",
                        priority_class="high", image_pull_secret="regcred", output="oss://b/out/"),
}


# ------------------------------------------------------------------------------------ CRD schema, strict


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    name = {"TrainJob": "trainjobs", "TrainingRuntime": "trainingruntimes"}[kind]
    with gzip.open(FIXTURES / f"trainer.kubeflow.org_{name}.yaml.gz", "rt", encoding="utf-8") as f:
        crd = next(d for d in yaml.safe_load_all(f) if d)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def strict(node: Any) -> Any:
    """An openAPIV3Schema as JSON Schema the way the API server applies it: unknown fields refused,
    ``x-kubernetes-int-or-string`` either type, ``nullable`` allows null."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        out["type"] = [out["type"], "null"] if "type" in out else None
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _rules(schema: dict[str, Any], obj: Any, path: str = "") -> list[tuple[str, str, Any]]:
    """Every CEL rule of ``schema`` that applies to a value present in ``obj``: ``(path, rule, value)``."""
    found = [(path, r["rule"], obj) for r in schema.get("x-kubernetes-validations") or []]
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in (schema.get("properties") or {}):
                found += _rules(schema["properties"][k], v, f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += _rules(schema["additionalProperties"], v, f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            found += _rules(schema["items"], v, f"{path}[{i}]")
    return found


CEL = {
    # TrainJob's name is a DNS-1035 label, at most 63 characters (it names the JobSet and its Services)
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda v: re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", v["metadata"]["name"]) is not None,
    "size(self.metadata.name) <= 63": lambda v: len(v["metadata"]["name"]) <= 63,
    # at most one ML policy
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)].filter(x, x).size() <= 1":
        lambda v: sum(k in v for k in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1,
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))":
        lambda v: not (v.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder"
                       and any("dependsOn" in x for x in v["replicatedJobs"])),
}  # fmt: skip
"""The CRDs' create-time CEL rules, in Python. Transition rules (``oldSelf``) apply only to updates."""


def validate_trainer_object(doc: dict[str, Any]) -> None:
    schema = crd_schema(doc["kind"])
    jsonschema.Draft7Validator(strict(schema)).validate(doc)
    for path, rule, value in _rules(schema, doc):
        if "oldSelf" in rule:
            continue
        assert rule in CEL, f"{doc['kind']}{path}: CEL rule not known to this test: {rule}"
        assert CEL[rule](value), f"{doc['kind']}{path}: violates {rule}"


def validate_core_parts(runtime: dict[str, Any]) -> None:
    """The runtime's Jobs as real ``batch/v1`` Jobs (podFailurePolicy, pod template), strictly."""
    for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rj["name"]},
               **{"spec": copy.deepcopy(rj["template"]["spec"])}}  # fmt: skip
        job["spec"]["template"]["spec"]["containers"][0].setdefault("image", "x")
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rendered_objects_validate_against_the_trainer_v2_crds(name: str) -> None:
    docs = trainer.render(VARIANTS[name])
    kinds = [d["kind"] for d in docs]
    assert kinds[-2:] == ["TrainingRuntime", "TrainJob"]
    for doc in docs:
        if doc["apiVersion"] == trainer.API_VERSION:
            validate_trainer_object(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    validate_core_parts(docs[-2])


def test_crd_validation_is_not_vacuous() -> None:
    runtime, job = trainer.render(opts())[-2:]
    for doc, path, value in [
        (job, ["spec", "trainer", "gpuz"], 1),  # an unknown field
        (job, ["spec", "trainer", "numNodes"], "two"),  # a wrong type
        (job, ["spec", "runtimeRef", "kind"], None),  # null where a string goes
        (runtime, ["spec", "template", "spec", "failurePolicy", "rules", 0, "action"], "Retry"),  # not in the enum
    ]:
        bad = copy.deepcopy(doc)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_trainer_object(bad)
    long = copy.deepcopy(job)
    long["metadata"]["name"] = "Kolors_Job"
    with pytest.raises(AssertionError, match="violates"):
        validate_trainer_object(long)


# ------------------------------------------------------------------------------------ same pod, same policy


def test_trainjob_pods_are_the_batch_jobs_pods() -> None:
    """Same volumes, env, security context, identity, scheduling and grace period as ``render k8s``'s Job."""
    o = opts(gpus=4, secret="creds", rrsa_role_name="r", oss_region="cn-shanghai", manifest_uri="oss://b/m.yaml",
             node_selector={"pool": "gpu"}, image_pull_secret="reg", priority_class="p", termination_grace_seconds=300)  # fmt: skip
    runtime, job = trainer.render(o)[-2:]
    ref = k8s.render_job(o)["spec"]["template"]["spec"]
    (rj,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = rj["template"]["spec"]["template"]["spec"]
    for key in ("volumes", "securityContext", "serviceAccountName", "automountServiceAccountToken", "nodeSelector",
                "tolerations", "imagePullSecrets", "priorityClassName", "terminationGracePeriodSeconds", "restartPolicy"):
        assert pod[key] == ref[key], key
    (c,) = pod["containers"]
    (rc,) = ref["containers"]
    for key in ("volumeMounts", "securityContext", "envFrom"):
        assert c[key] == rc[key], key
    t = job["spec"]["trainer"]
    assert t["env"] == rc["env"] and t["resourcesPerNode"] == rc["resources"] and t["image"] == rc["image"]
    assert {"name": "KOLORS_JOB_OSS_ENDPOINT", "value": "https://oss-cn-shanghai-internal.aliyuncs.com"} in t["env"]
    assert t["command"] == [*rc["command"][:5], f"--shutdown-timeout={300 - 10}"], "torchrun, not --standalone"
    assert t["args"] == ["/app/entrypoint.py", "run", "--job-id", "t-1"]
    assert (t["numNodes"], t["numProcPerNode"]) == (1, 4)
    assert not {e["name"] for e in t["env"]} & set(trainer.RESERVED_ENV)


def test_the_failure_policy_is_the_exit_code_contract() -> None:
    """Permanent codes fail the JobSet at once; 75 or a kill restarts every node (resuming), at most
    --backoff-limit times; a preemption is not counted — the batch Job's podFailurePolicy, for all nodes."""
    runtime = trainer.render(opts(nodes=2, backoff_limit=5))[-2]
    spec = runtime["spec"]["template"]["spec"]
    (rj,) = spec["replicatedJobs"]
    job_spec = rj["template"]["spec"]
    ref = k8s.render_job(opts())["spec"]["podFailurePolicy"]
    for rule in ref["rules"]:
        if "onExitCodes" in rule:
            rule["onExitCodes"]["containerName"] = trainer.NODE
    assert job_spec["podFailurePolicy"] == ref
    assert job_spec["backoffLimit"] == 0 and job_spec["podReplacementPolicy"] == "Failed"
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy needs it"
    assert spec["failurePolicy"]["maxRestarts"] == 5
    (rule,) = spec["failurePolicy"]["rules"]
    assert rule["action"] == "FailJobSet" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    failjob = next(r for r in ref["rules"] if r["action"] == "FailJob")
    assert failjob["onExitCodes"]["values"] == [1, 2, 3, 4, 5, 6] and int(ExitCode.TEMPORARY) not in failjob["onExitCodes"]["values"]


def test_the_runtime_keeps_the_stock_torch_distributed_shape() -> None:
    """What Trainer needs to find its trainer container (``torch-distributed`` at v2.3.0, and its webhook):
    a ``node`` replicated job of one replica labelled as the trainer ancestor, holding a ``node`` container,
    and ``mlPolicy.torch`` (which injects PET_* for torchrun)."""
    stock = yaml.safe_load((FIXTURES / "torch_distributed.yaml").read_text(encoding="utf-8"))
    runtime = trainer.render(opts())[-2]
    assert runtime["spec"]["mlPolicy"] == stock["spec"]["mlPolicy"]
    (ours,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (theirs,) = stock["spec"]["template"]["spec"]["replicatedJobs"]
    assert ours["name"] == theirs["name"] == trainer.NODE
    assert ours["template"]["metadata"]["labels"] == theirs["template"]["metadata"]["labels"]
    assert ours.get("replicas", 1) == 1
    names = [c["name"] for c in ours["template"]["spec"]["template"]["spec"]["containers"]]
    assert names == [c["name"] for c in theirs["template"]["spec"]["template"]["spec"]["containers"]] == ["node"]


def test_one_runtime_per_set_of_cluster_options() -> None:
    """Two runs with the same cluster options share a runtime (re-applying it changes nothing); other options
    get another one, so a running job's runtime is never changed under it."""
    a, b = trainer.render(opts(job_id="a"))[-2], trainer.render(opts(job_id="b", manifest_uri="s3://b/2.yaml"))[-2]
    assert a == b
    c = trainer.render(opts(shm_size="32Gi"))[-2]
    assert c["metadata"]["name"] != a["metadata"]["name"]
    assert trainer.render(opts(job_id="a"))[-1]["spec"]["runtimeRef"]["name"] == a["metadata"]["name"]
    with pytest.raises(ValueError, match="PET_MASTER_PORT"):
        trainer.render(opts(extra_env={"PET_MASTER_PORT": "1"}))


def test_several_nodes_share_a_read_write_many_cache() -> None:
    (pvc,) = [d for d in trainer.render(opts(nodes=2, create_cache_pvc="1Ti")) if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (pvc,) = [d for d in trainer.render(opts(create_cache_pvc="1Ti")) if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


# ------------------------------------------------------------------------------------ CLI and example


def run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    ns = p.parse_args(argv)
    return ns.func(ns)


def test_render_trainjob_prints_only_objects(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", "trainjob", "--manifest-uri", "oss://b/m.yaml", "--image", "img:1", "--job-id", "tj-1",
            "--nodes", "2", "--gpus", "8", "--oss-region", "cn-beijing", "--namespace", "ml"]  # fmt: skip
    assert run_cli(argv) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))  # stdout: YAML alone, for `| kubectl apply -f -`
    assert [d["kind"] for d in docs] == ["Namespace", "PersistentVolumeClaim", "TrainingRuntime", "TrainJob"]
    for doc in docs[2:]:
        validate_trainer_object(doc)
    assert run_cli([*argv[:-4]]) == int(ExitCode.INVALID_MANIFEST)  # an oss:// manifest without a region
    assert "--oss-region" in capsys.readouterr().err


def test_committed_example_is_current(tmp_path: Path) -> None:
    assert run_cli(["render", "trainjob", "--write-examples", str(tmp_path)]) == 0
    for fname in trainer.EXAMPLES:
        committed = (ROOT / "k8s" / fname).read_text(encoding="utf-8")
        assert committed == (tmp_path / fname).read_text(encoding="utf-8"), (
            f"k8s/{fname} is stale: run `kolors-job render trainjob --write-examples k8s/`")
        for doc in yaml.safe_load_all(committed):
            if doc["apiVersion"] == trainer.API_VERSION:
                validate_trainer_object(doc)
