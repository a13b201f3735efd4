"""Kubernetes objects: valid against real API schemas, faithful to the exit-code contract, examples current.

Core kinds validate with kubernetes-validate's offline schemas (strict: unknown fields fail). It ships no
schema for PyTorchJob, so that one goes through the Kubeflow training SDK's own models (a lossless
round-trip means every field is one the operator knows) and its pod templates through the core schema.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kolors_job.core.errors import ExitCode
from kolors_job.launch import k8s, pod, register_cli
from kolors_job.launch.outputs import fresh_job_id
from kolors_job.launch.torchrun import exit_code_of, retryable_code
from kolors_job.manifest.fields import JOB_ID_PATTERN

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    return ns.func(ns)


def opts(**kw: object) -> pod.RenderOptions:
    base: dict[str, object] = {
        "job_id": "t-1",
        "image": "registry.example/kolors-job:1",
        "manifest_uri": "s3://b/m.yaml",
    }
    base.update(kw)
    return pod.RenderOptions(**base)  # type: ignore[arg-type]


VARIANTS = {
    "1gpu": opts(),
    "4gpu-secret-emptydir": opts(gpus=4, secret="creds", cache_pvc=None, node_selector={"gpu": "a100"}),
    "irsa-pvc-queue": opts(
        irsa_role_arn="arn:aws:iam::1:role/r", create_cache_pvc="100Gi", queue="gpu", output="s3://o/"
    ),
    "2x8-pytorchjob": opts(nodes=2, gpus=8, rrsa_role_name="kolors", create_cache_pvc="1Ti", storage_class="nas"),
    "3x1-pytorchjob": opts(nodes=3, namespace="ml", priority_class="high", image_pull_secret="regcred"),
    "1x2-forced-pytorchjob": opts(kind="pytorchjob", gpus=2),
}


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return []


def validate_core(doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rendered_objects_validate_against_kubernetes_schemas(name: str, version: str) -> None:
    for doc in k8s.render(VARIANTS[name]):
        if doc["kind"] == "PyTorchJob":
            for i, tpl in enumerate(pod_templates(doc)):
                wrapper = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"t{i}"},
                    "template": tpl,
                }
                validate_core(wrapper, version)
        else:
            validate_core(doc, version)


def test_schema_validation_is_not_vacuous() -> None:
    job = k8s.render_job(opts())
    job["spec"]["template"]["spec"]["containers"][0]["gpuz"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(job, K8S_VERSIONS[-1])


@pytest.mark.parametrize("name", [n for n in sorted(VARIANTS) if "pytorchjob" in n])
def test_pytorchjob_round_trips_through_the_kubeflow_sdk(name: str) -> None:
    from kubeflow.training import ApiClient
    from kubeflow.training.constants import constants

    doc = k8s.workload(k8s.render(VARIANTS[name]))

    class Response:
        data = json.dumps(doc)

    client = ApiClient()
    model = client.deserialize(Response(), constants.PYTORCHJOB_MODEL)
    assert type(model).__name__ == "KubeflowOrgV1PyTorchJob"
    assert client.sanitize_for_serialization(model) == doc
    for replica in model.spec.pytorch_replica_specs.values():
        assert replica.template.spec.containers[0].name == constants.PYTORCHJOB_CONTAINER


def test_job_encodes_the_exit_code_contract() -> None:
    job = k8s.render_job(opts())
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    by_action = {r["action"]: r for r in rules[1:]}
    assert by_action["FailJob"]["onExitCodes"]["values"] == [1, 2, 3, 4, 5, 6], "a bug (1) is not retried either"
    assert by_action["Count"]["onExitCodes"]["values"] == [int(ExitCode.TEMPORARY)]
    assert {r["onExitCodes"]["containerName"] for r in rules[1:]} == {pod["containers"][0]["name"]}
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert isinstance(spec[key], int) and spec[key] > 0
    assert pod["terminationGracePeriodSeconds"] >= 120


def test_pod_has_gpus_shm_cache_and_runs_non_root() -> None:
    for doc in (k8s.render_job(opts(gpus=2)), k8s.render_pytorchjob(opts(nodes=2, gpus=2))):
        for tpl in pod_templates(doc):
            pod = tpl["spec"]
            c = pod["containers"][0]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"] == "kolors-job-cache"
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert pod["automountServiceAccountToken"] is False
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["KOLORS_JOB_MANIFEST_URI"] == "s3://b/m.yaml"
            # scratch on the pod's own emptyDir, never the shared cache volume
            assert env["KOLORS_JOB_WORK_DIR"].startswith("/tmp/") and "emptyDir" in volumes[mounts["/tmp"]]
            assert "nodeSelector" in pod and pod["tolerations"]
            assert c["args"][-3:] == ["run", "--job-id", "t-1"]


def test_multi_gpu_runs_the_exit_code_preserving_launcher() -> None:
    one = k8s.render_job(opts())["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in one and one["args"] == ["run", "--job-id", "t-1"]  # the image ENTRYPOINT
    four = k8s.render_job(opts(gpus=4))["spec"]["template"]["spec"]["containers"][0]
    assert four["command"][:5] == ["tini", "--", "python", "-m", "kolors_job.launch.torchrun"]
    assert "--standalone" in four["command"] and "--nproc-per-node=4" in four["command"]


def test_pytorchjob_shape_and_retryable_exit_code() -> None:
    doc = k8s.render_pytorchjob(opts(nodes=3, gpus=8))
    spec = doc["spec"]
    assert doc["apiVersion"] == "kubeflow.org/v1" and spec["nprocPerNode"] == "8"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    rp = spec["runPolicy"]
    assert rp["cleanPodPolicy"] in ("Running", "All", "None") and rp["backoffLimit"] >= 1
    assert rp["activeDeadlineSeconds"] > 0 and rp["ttlSecondsAfterFinished"] > 0
    for replica in spec["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "ExitCode"
        c = replica["template"]["spec"]["containers"][0]
        assert c["name"] == "pytorch"
        env = {e["name"]: e["value"] for e in c["env"]}
        code = int(env["KOLORS_JOB_RETRYABLE_EXIT_CODE"])
        assert 128 <= code <= 255, "ExitCode policy retries only 128-255"
        assert code not in (137, 143), "must not look like SIGKILL/SIGTERM"
        assert retryable_code(env) == code
        assert c["command"][4] == "kolors_job.launch.torchrun" and "--standalone" not in c["command"]


def test_names_are_dns_labels_even_for_long_ids() -> None:
    long_id = "a" * 40 + ".b_c-" + "d" * 18
    name = k8s.k8s_name(long_id)
    assert DNS1035.match(name) and len(name) <= 48
    assert k8s.k8s_name(long_id) != k8s.k8s_name(long_id[:-1] + "e")
    doc = k8s.render_pytorchjob(opts(job_id=long_id, nodes=2))
    labels = doc["metadata"]["labels"]
    assert all(len(v) <= 63 for v in labels.values())


def test_render_refuses_impossible_shapes() -> None:
    with pytest.raises(ValueError):
        k8s.render(opts(kind="job", nodes=2))
    with pytest.raises(ValueError):
        k8s.render(opts(gpus=0))


def test_committed_examples_are_current(tmp_path: Path) -> None:
    """k8s/*.yaml are generated; this fails when the renderer changed and they were not regenerated."""
    assert run_cli(["render", "k8s", "--write-examples", str(tmp_path)]) == 0
    for fname in k8s.EXAMPLES:
        fresh = (tmp_path / fname).read_text(encoding="utf-8")
        committed = (ROOT / "k8s" / fname).read_text(encoding="utf-8")
        assert committed == fresh, f"k8s/{fname} is stale: run `kolors-job render k8s --write-examples k8s/`"
        for doc in yaml.safe_load_all(committed):
            if doc["kind"] != "PyTorchJob":
                validate_core(doc, K8S_VERSIONS[-1])


def test_render_cli(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", "k8s", "--manifest-uri", "s3://b/m.yaml", "--image", "img:1", "--job-id", "cli-1"]
    assert run_cli([*argv, "--gpus", "2", "--toleration", "dedicated=gpu:NoSchedule", "--env", "A=b"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    job = k8s.workload(docs)
    pod = job["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    assert {"name": "A", "value": "b"} in pod["containers"][0]["env"]
    assert run_cli([*argv, "--nodes", "2"]) == 0
    assert k8s.workload(list(yaml.safe_load_all(capsys.readouterr().out)))["kind"] == "PyTorchJob"
    assert run_cli([*argv, "--nodes", "2", "--kind", "job"]) == int(ExitCode.INVALID_MANIFEST)
    assert run_cli(["render", "k8s", "--image", "img:1"]) == int(ExitCode.INVALID_MANIFEST)
    assert run_cli([*argv[:-2], "--job-id", "Bad Id"]) == int(ExitCode.INVALID_MANIFEST)
    assert re.fullmatch(JOB_ID_PATTERN, fresh_job_id("Purple Hair Girl!"))


def _containers(docs: list[dict]) -> list[dict]:
    return [tpl["spec"]["containers"][0] for d in docs for tpl in pod_templates(d)]


def test_every_oss_spec_carries_its_endpoint_and_render_refuses_one_without(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without KOLORS_JOB_OSS_ENDPOINT an oss:// job exits 5 at its first read: say so when rendering."""
    for fname in k8s.EXAMPLES:
        for c in _containers(list(yaml.safe_load_all((ROOT / "k8s" / fname).read_text(encoding="utf-8")))):
            env = {e["name"]: e["value"] for e in c["env"]}
            if env["KOLORS_JOB_MANIFEST_URI"].startswith("oss://"):
                assert env["KOLORS_JOB_OSS_ENDPOINT"].startswith("https://oss-"), fname
    with pytest.raises(ValueError, match=r"--oss-region REGION .* or --oss-endpoint URL"):
        k8s.render(opts(manifest_uri="oss://b/m.yaml"))
    with pytest.raises(ValueError, match="--oss-region"):
        k8s.render(opts(output="oss://b/out/"))
    assert k8s.render(opts(manifest_uri="oss://b/m.yaml", extra_env={"OSS_ENDPOINT": "https://oss-x.aliyuncs.com"}))
    argv = ["render", "k8s", "--manifest-uri", "oss://b/m.yaml", "--image", "img:1", "--job-id", "o-1"]
    assert run_cli(argv) == int(ExitCode.INVALID_MANIFEST)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kolors-job render k8s: --oss-region: oss://b/m.yaml")
    assert run_cli([*argv, "--oss-endpoint", "https://oss-cn-beijing.aliyuncs.com"]) == 0
    (c,) = _containers([k8s.workload(list(yaml.safe_load_all(capsys.readouterr().out)))])
    assert {"name": "KOLORS_JOB_OSS_ENDPOINT", "value": "https://oss-cn-beijing.aliyuncs.com"} in c["env"]


@pytest.mark.parametrize("region", ["cn-beijing", "cn-shanghai", "ap-southeast-1"])
def test_the_pods_oss_endpoint_follows_the_clusters_region(region: str, capsys: pytest.CaptureFixture[str]) -> None:
    """ACK in any region: --oss-region gives the pod that region's internal endpoint; --oss-endpoint wins."""
    argv = ["render", "k8s", "--manifest-uri", "oss://b/m.yaml", "--image", "img:1", "--job-id", "r-1",
            "--oss-region", region]  # fmt: skip
    for extra, want in (([], f"https://oss-{region}-internal.aliyuncs.com"),
                        (["--oss-endpoint", "https://oss-eu-central-1.aliyuncs.com"],
                         "https://oss-eu-central-1.aliyuncs.com")):  # fmt: skip
        assert run_cli([*argv, *extra]) == 0
        docs = list(yaml.safe_load_all(capsys.readouterr().out))
        (c,) = _containers([k8s.workload(docs)])
        assert {e["name"]: e["value"] for e in c["env"]}["KOLORS_JOB_OSS_ENDPOINT"] == want
    assert run_cli([*argv[:-1], "Beijing"]) == int(ExitCode.INVALID_MANIFEST)
    assert "--oss-region: region 'Beijing' is not" in capsys.readouterr().err


def test_scratch_has_an_ephemeral_storage_request_and_a_size_limit() -> None:
    """/tmp scratch holds frames, checkpoints before upload and the LoRA: a node must have that much disk,
    and a runaway scratch is bounded (the kubelet evicts the pod past sizeLimit)."""
    for doc in (k8s.render_job(opts()), k8s.render_pytorchjob(opts(nodes=2, scratch_size="50Gi"))):
        for tpl in pod_templates(doc):
            c = tpl["spec"]["containers"][0]
            tmp = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            (vol,) = [v for v in tpl["spec"]["volumes"] if v["name"] == tmp]
            assert vol["emptyDir"]["sizeLimit"] == c["resources"]["requests"]["ephemeral-storage"]
            assert vol["emptyDir"]["sizeLimit"] in ("20Gi", "50Gi")
    with pytest.raises(ValueError, match="--scratch-size"):
        k8s.render(opts(scratch_size="big"))


def test_the_ack_example_uses_rrsa_the_regions_endpoint_and_the_gpu_pools_taint() -> None:
    """k8s/ack-job.yaml, beside the EKS one (job.yaml, IRSA): keyless OSS through RRSA (annotated
    ServiceAccount + the injection label on the namespace), the internal endpoint of the cluster's region, the
    GPU node pool's taint tolerated and its GPU model selected, ACR in-VPC image, an ACK disk StorageClass."""
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "ack-job.yaml").read_text(encoding="utf-8")))
    by_kind = {d["kind"]: d for d in docs}
    assert by_kind["Namespace"]["metadata"]["labels"]["pod-identity.alibabacloud.com/injection"] == "on"
    sa = by_kind["ServiceAccount"]
    assert sa["metadata"]["annotations"] == {"pod-identity.alibabacloud.com/role-name": "kolors-job"}
    pod = by_kind["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["tolerations"] == [{"key": "gpu-pool", "operator": "Equal", "value": "a10", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"aliyun.accelerator/nvidia_name": "NVIDIA-A10"}
    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KOLORS_JOB_OSS_ENDPOINT"] == "https://oss-cn-beijing-internal.aliyuncs.com"
    assert c["image"].startswith("registry-vpc.cn-beijing.aliyuncs.com/")
    assert "envFrom" not in c, "no static keys: RRSA"
    assert by_kind["PersistentVolumeClaim"]["spec"]["storageClassName"] == "alicloud-disk-topology-alltype"
    eks = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "k8s" / "job.yaml").read_text(encoding="utf-8"))}
    assert "eks.amazonaws.com/role-arn" in eks["ServiceAccount"]["metadata"]["annotations"]


def test_validate_notes_oss_uris_without_an_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kolors_job.cli import main

    for var in ("KOLORS_JOB_OSS_ENDPOINT", "KOLORS_JOB_OSS_REGION", "OSS_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    m = tmp_path / "m.yaml"
    m.write_text("spec: {output: {uri: 'oss://bkt/runs/'}, dataset: {source: 'oss://bkt/data/'}}")
    assert main(["validate", str(m)]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("# note:")]
    assert [n.split(" needs")[0] for n in notes] == [
        "# note: spec.dataset.source: oss://bkt/data/", "# note: spec.output.uri: oss://bkt/runs/"]
    monkeypatch.setenv("KOLORS_JOB_OSS_ENDPOINT", "https://oss-cn-hangzhou.aliyuncs.com")
    assert main(["validate", str(m)]) == 0
    assert "# note:" not in capsys.readouterr().err


def test_torchrun_gets_the_grace_period_not_its_30_s_default() -> None:
    """Every place torchrun starts: the 4-GPU Job, each PyTorchJob replica (custom grace too), DLC."""
    from kolors_job.launch import dlc
    from kolors_job.launch.torchrun import shutdown_timeout

    for grace in (120, 600):
        docs = [k8s.render_job(opts(gpus=4, termination_grace_seconds=grace)),
                k8s.render_pytorchjob(opts(nodes=2, gpus=8, termination_grace_seconds=grace))]
        for doc in docs:
            for tpl in pod_templates(doc):
                c = tpl["spec"]["containers"][0]
                assert tpl["spec"]["terminationGracePeriodSeconds"] == grace
                (flag,) = [a for a in c["command"] if a.startswith("--shutdown-timeout=")]
                timeout = int(flag.split("=")[1])
                assert timeout == shutdown_timeout(grace) and 30 < timeout < grace
                assert {"name": "KOLORS_JOB_GRACE_SECONDS", "value": str(grace)} in c["env"]
    for pods, nproc in ((1, 4), (2, 8)):
        cmd = dlc.user_command(job_id="j", output=None, nproc_per_node=nproc, pod_count=pods, grace_seconds=300)
        assert f"--shutdown-timeout={shutdown_timeout(300)}" in cmd
    assert "torchrun" not in dlc.user_command(job_id="j", output=None, nproc_per_node=1, pod_count=1)


def test_memory_limit_grows_with_the_ranks_per_pod() -> None:
    """Each rank holds its own host copy at load: 4 ranks + the in-memory /dev/shm exceed a flat 64Gi."""
    def limit(doc: dict) -> str:
        return pod_templates(doc)[0]["spec"]["containers"][0]["resources"]["limits"]["memory"]

    per, base = pod.HOST_MEMORY_PER_RANK_GIB, pod.HOST_MEMORY_BASE_GIB
    assert limit(k8s.render_job(opts())) == f"{base + per + 16}Gi"
    assert limit(k8s.render_job(opts(gpus=4))) == f"{base + 4 * per + 16}Gi"
    assert limit(k8s.render_pytorchjob(opts(nodes=2, gpus=8, shm_size="32Gi"))) == f"{base + 8 * per + 32}Gi"
    assert pod.memory_for(2, "512Mi") == f"{base + 2 * per + 1}Gi"
    assert limit(k8s.render_job(opts(gpus=4, memory="300Gi"))) == "300Gi"  # an explicit --memory wins
    with pytest.raises(ValueError, match="--shm-size"):
        pod.memory_for(1, "lots")


def test_namespace_and_cache_pvc_it_assumes_are_rendered() -> None:
    kinds = [d["kind"] for d in k8s.render(opts(namespace="ml", rrsa_role_name="r"))]
    assert kinds == ["Namespace", "ServiceAccount", "PersistentVolumeClaim", "Job"]
    ns = k8s.render(opts(namespace="ml", rrsa_role_name="r"))[0]
    assert ns["metadata"]["labels"]["pod-identity.alibabacloud.com/injection"] == "on"  # RRSA needs it
    for doc in k8s.render(opts(namespace="ml")):
        validate_core(doc, K8S_VERSIONS[0])
    assert [d["kind"] for d in k8s.render(opts(create_cache_pvc=None, create_namespace=False))] == ["Job"]


def test_each_attempt_is_a_new_workload_of_the_same_job_id() -> None:
    """A failed Job cannot be re-run by applying it again ("unchanged"): a new name, same job id."""
    long_id = "z" * 70
    for job_id in ("ci-123", long_id):
        a, b = (k8s.render_job(opts(job_id=job_id, attempt=x)) for x in ("a1b2c3", "d4e5f6"))
        assert a["metadata"]["name"] != b["metadata"]["name"]
        for doc in (a, b):
            assert DNS1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 48
            assert doc["metadata"]["labels"]["kolors-job/job-id"] == k8s.job_id_label(job_id)
            assert {"--job-id", job_id} <= set(doc["spec"]["template"]["spec"]["containers"][0]["args"])
    assert k8s.render_job(opts())["metadata"]["name"] == "kolors-t-1"  # render without an attempt: stable


# ------------------------------------------------------------------------------------ torchrun wrapper


class _F:
    def __init__(self, exitcode: int, timestamp: int) -> None:
        self.exitcode, self.timestamp = exitcode, timestamp


def test_exit_code_of_prefers_the_first_real_failure() -> None:
    assert exit_code_of({0: _F(-15, 2), 1: _F(4, 3)}) == 4  # rank 0 was killed after rank 1 failed
    assert exit_code_of({0: _F(203, 1), 1: _F(2, 5)}) == 203
    assert exit_code_of({0: _F(-9, 1)}) == 137
    assert retryable_code({}) == 75 and retryable_code({"KOLORS_JOB_RETRYABLE_EXIT_CODE": "x"}) == 75


def test_torchrun_wrapper_keeps_the_failing_ranks_exit_code(tmp_path: Path) -> None:
    """Real torchrun, 2 CPU processes: rank 1 exits 4 (invalid input), the launcher must exit 4, not 1."""
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            if os.environ["RANK"] == "1":
                sys.exit(int(os.environ["CODE"]))
            time.sleep(30)
            """
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kolors_job.launch.torchrun",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
        ],
        env={**os.environ, "CODE": "4", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 4, r.stderr[-2000:]


def test_torchrun_wrapper_gives_the_workers_the_grace_period_to_checkpoint(tmp_path: Path) -> None:
    """Real torchrun, 2 CPU workers that take ``SLOW`` s to "checkpoint" after SIGTERM. With
    KOLORS_JOB_GRACE_SECONDS=8 the wrapper sets a 6 s shutdown timeout: 2 s of work finishes (both ranks
    write their checkpoint, exit 75), 12 s of work is SIGKILLed at ~6 s — so the window is the one derived
    from the grace period, not torchrun's fixed 30 s."""
    import signal
    import time

    from kolors_job.launch.torchrun import shutdown_timeout

    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(
        """
        import os, signal, sys, time
        out = sys.argv[1]
        def stop(*_):
            time.sleep(float(os.environ["SLOW"]))
            open(f"{out}/ckpt-{os.environ['RANK']}", "w").close()
            sys.exit(75)
        signal.signal(signal.SIGTERM, stop)
        open(f"{out}/ready-{os.environ['RANK']}", "w").close()
        while True:
            time.sleep(0.1)
        """
    ))
    assert shutdown_timeout(8) == 6
    results = {}
    for slow in (2, 12):
        out = tmp_path / f"slow-{slow}"
        out.mkdir()
        env = {**os.environ, "SLOW": str(slow), "OMP_NUM_THREADS": "1", "KOLORS_JOB_GRACE_SECONDS": "8"}
        env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
        proc = subprocess.Popen([sys.executable, "-m", "kolors_job.launch.torchrun", "--standalone",
                                 "--nproc-per-node=2", str(script), str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while len(list(out.glob("ready-*"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(list(out.glob("ready-*"))) == 2
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
            results[slow] = (rc, time.monotonic() - sent, sorted(p.name for p in out.glob("ckpt-*")))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rc, took, ckpts = results[2]
    assert ckpts == ["ckpt-0", "ckpt-1"] and rc == 75 and took < 6, results
    rc, took, ckpts = results[12]
    assert ckpts == [] and 5 <= took < 11, results  # SIGKILL at the 6 s shutdown timeout, not at 30 s
