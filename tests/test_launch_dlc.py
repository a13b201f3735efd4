"""PAI-DLC: the spec maps onto the official SDK's CreateJobRequest without loss, and the request
``submit dlc`` sends is the one we built — checked on a real HTTP exchange with a loopback server."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from alibabacloud_pai_dlc20201203.models import CreateJobRequest

from kolors_job.launch import dlc, pod
from kolors_job.launch.k8s import RETRYABLE_EXIT_CODE
from tests.pai_api import FakePaiApi

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "pai" / "job.yaml"
FILLED = [
    "WorkspaceId=12345",
    "DataSources.0.Uri=oss://cache-bkt.oss-cn-hangzhou-internal.aliyuncs.com/kolors-job-cache/",
    "CredentialConfig.CredentialConfigItems.0.Roles.0.RoleArn=acs:ram::1234567890:role/kolors-job",
]


@pytest.fixture
def spec() -> dict[str, Any]:
    return dlc.load_spec(SPEC)


def build(spec: dict[str, Any], **kw: Any) -> CreateJobRequest:
    args: dict[str, Any] = {
        "manifest_uri": "oss://b/jobs/j1/manifest.yaml",
        "job_id": "j1",
        "image": "reg/kj:1",
    }
    args.update(kw)
    args.setdefault("overrides", FILLED)
    return dlc.build_request(spec, **args)


def test_spec_round_trips_through_create_job_request(spec: dict[str, Any]) -> None:
    request = CreateJobRequest().from_map(copy.deepcopy(spec))
    assert dlc.prune(request.to_map()) == spec  # nothing dropped, nothing changed
    assert dlc.prune(spec) == spec, "the spec should hold no empty lists/maps (the SDK adds those itself)"
    again = CreateJobRequest().from_map(request.to_map())
    assert again.to_map() == request.to_map()


def test_spec_covers_what_a_kolors_job_needs(spec: dict[str, Any]) -> None:
    assert spec["JobType"] == "PyTorchJob" and spec["DisplayName"]
    (worker,) = spec["JobSpecs"]
    assert worker["Type"] == "Worker" and worker["PodCount"] == 1 and "UseSpotInstance" in worker
    assert worker.get("EcsSpec") or worker.get("ResourceConfig")
    assert any(ds["MountPath"] == "/cache" for ds in spec["DataSources"])
    assert spec["Envs"]["KOLORS_JOB_CACHE_DIR"] == "/cache"
    assert spec["Envs"]["KOLORS_JOB_WORK_DIR"].startswith("/tmp/")  # local disk, not the OSS mount
    assert spec["JobMaxRunningTimeMinutes"] > 0
    s = spec["Settings"]
    assert s["EnableErrorMonitoringInAIMaster"] is True and "--enable-job-restart" in s["ErrorMonitoringArgs"]
    assert s["TerminationGracePeriodSeconds"] >= 120
    assert spec["CredentialConfig"]["EnableCredentialInject"] is True
    text = SPEC.read_text(encoding="utf-8")
    assert "AccessKey" not in yaml.safe_dump(spec["Envs"]) and "LTAI" not in text


def test_unknown_or_misspelled_fields_are_refused(spec: dict[str, Any]) -> None:
    bad = copy.deepcopy(spec)
    bad["JobMaxRunTimeMinutes"] = 10  # typo: the SDK would silently drop it
    bad["JobSpecs"][0]["GPUs"] = 2
    with pytest.raises(dlc.DlcSpecError) as e:
        dlc.to_request(bad)
    assert "JobMaxRunTimeMinutes" in str(e.value) and "JobSpecs[0].GPUs" in str(e.value)


def test_placeholders_must_be_filled(spec: dict[str, Any]) -> None:
    with pytest.raises(dlc.DlcSpecError) as e:
        build(spec, overrides=[])
    assert "<WORKSPACE_ID>" in str(e.value) and "<CACHE_BUCKET>" in str(e.value)
    with pytest.raises(dlc.DlcSpecError):
        build(spec, image=None)  # <IMAGE> left
    with pytest.raises(dlc.DlcSpecError):
        build(spec, overrides=[*FILLED, "JobSpecs.7.PodCount=2"])


def test_request_carries_this_runs_manifest_job_id_and_command(spec: dict[str, Any]) -> None:
    req = build(spec, output="oss://out/runs/")
    req.validate()
    m = req.to_map()
    assert m["WorkspaceId"] == "12345", "a numeric workspace id stays a string"
    assert m["DisplayName"] == "kolors-job-j1"
    assert m["Envs"]["KOLORS_JOB_MANIFEST_URI"] == "oss://b/jobs/j1/manifest.yaml"
    assert "KOLORS_JOB_RETRYABLE_EXIT_CODE" not in m["Envs"]
    assert m["JobSpecs"][0]["Image"] == "reg/kj:1"
    assert m["UserCommand"] == "python /app/entrypoint.py run --job-id j1 --output oss://out/runs/"
    assert spec["JobSpecs"][0]["Image"] == "<IMAGE>", "the loaded spec is not mutated"
    # The request itself is lossless too.
    assert dlc.prune(CreateJobRequest().from_map(m).to_map()) == dlc.prune(m)


def test_multi_gpu_and_multi_node_commands_and_exit_code_policy(spec: dict[str, Any]) -> None:
    one_node = build(spec, nproc_per_node=8).to_map()["UserCommand"]
    assert one_node.startswith(
        "python -m kolors_job.launch.torchrun --shutdown-timeout=110 --standalone --nproc-per-node=8 "
    ), "the spec's 120 s grace period, less torchrun's own exit margin"
    multi = build(spec, overrides=[*FILLED, "JobSpecs.0.PodCount=2", "JobSpecs.0.RestartPolicy=ExitCode"])
    m = multi.to_map()
    assert "--nnodes=$WORLD_SIZE --node-rank=$RANK --master-addr=$MASTER_ADDR" in m["UserCommand"]
    assert m["JobSpecs"][0]["PodCount"] == 2
    assert m["Envs"]["KOLORS_JOB_RETRYABLE_EXIT_CODE"] == str(RETRYABLE_EXIT_CODE)


def test_oss_job_without_an_endpoint_is_refused_and_resource_memory_follows_the_ranks(spec: dict[str, Any]) -> None:
    assert "KOLORS_JOB_OSS_ENDPOINT" not in spec["Envs"], "the endpoint follows the job's region, not the spec"
    no_region = ["WorkspaceId=1", "DataSources.0.Uri=oss://c.oss-cn-hangzhou.aliyuncs.com/x/", FILLED[2]]
    with pytest.raises(dlc.DlcSpecError, match=r"^Envs\.KOLORS_JOB_OSS_ENDPOINT: oss://b/jobs/j1/manifest.yaml"):
        build(spec, overrides=no_region)  # a public mount endpoint says where the bucket is, not the job
    assert build(spec, manifest_uri="s3://b/m.yaml").to_map()["Envs"]["KOLORS_JOB_GRACE_SECONDS"] == "120"
    spec["JobSpecs"][0].pop("EcsSpec")
    spec["JobSpecs"][0]["ResourceConfig"] = {"CPU": "32", "GPU": "4", "SharedMemory": "16Gi"}
    m = build(spec, manifest_uri="s3://b/m.yaml", nproc_per_node=4).to_map()
    assert m["JobSpecs"][0]["ResourceConfig"]["Memory"] == pod.memory_for(4, "16Gi")


# ------------------------------------------------------------------------------- region → OSS endpoint

REGIONS = ["cn-beijing", "cn-shanghai", "ap-southeast-1"]


@pytest.mark.parametrize("region", REGIONS)
def test_the_oss_endpoint_and_the_cache_mount_follow_the_region(spec: dict[str, Any], region: str) -> None:
    """--region (ALIBABA_CLOUD_REGION_ID) gives the job its region's internal endpoint and fills <REGION>."""
    public = "DataSources.0.Uri=oss://c.oss-cn-hangzhou.aliyuncs.com/x/"  # a public endpoint mounts from anywhere
    m = build(spec, region=region, overrides=["WorkspaceId=1", FILLED[2], public]).to_map()
    assert m["Envs"]["KOLORS_JOB_OSS_ENDPOINT"] == f"https://oss-{region}-internal.aliyuncs.com"
    # the spec's own cache mount, with only the bucket filled in: in the job's region too
    mount = f"DataSources.0.Uri=oss://cache-{region}.oss-<REGION>-internal.aliyuncs.com/c/"
    m = build(spec, region=region, overrides=["WorkspaceId=1", FILLED[2], mount]).to_map()
    assert m["DataSources"][0]["Uri"] == f"oss://cache-{region}.oss-{region}-internal.aliyuncs.com/c/"
    # no --region: the region of an internal mount (DLC mounts only its own region's) is the job's
    mount = f"DataSources.0.Uri=oss://cache.oss-{region}-internal.aliyuncs.com/c/"
    m = build(spec, overrides=["WorkspaceId=1", FILLED[2], mount]).to_map()
    assert m["Envs"]["KOLORS_JOB_OSS_ENDPOINT"] == f"https://oss-{region}-internal.aliyuncs.com"


def test_an_explicit_endpoint_wins_and_a_mount_in_another_region_is_refused(spec: dict[str, Any]) -> None:
    explicit = "Envs.KOLORS_JOB_OSS_ENDPOINT=https://oss-cn-beijing.aliyuncs.com"
    m = build(spec, region="cn-shanghai", overrides=[*FILLED[:1], FILLED[2], explicit,
                                                     "DataSources.0.Uri=oss://c.oss-cn-shanghai-internal.aliyuncs.com/x/"]).to_map()  # fmt: skip
    assert m["Envs"]["KOLORS_JOB_OSS_ENDPOINT"] == "https://oss-cn-beijing.aliyuncs.com"
    with pytest.raises(dlc.DlcSpecError, match=r"^DataSources\[0\]\.Uri: .*cn-hangzhou but the job runs in cn-beijing"):
        build(spec, region="cn-beijing")  # FILLED mounts a Hangzhou-internal bucket
    with pytest.raises(dlc.DlcSpecError, match=r"<REGION>.*--region fills <REGION>"):
        build(spec, overrides=["WorkspaceId=1", FILLED[2]])  # neither a region nor a filled mount
    with pytest.raises(dlc.DlcSpecError, match=r"^--region: 'Beijing' is not"):
        build(spec, region="Beijing")


def test_render_dlc_outside_hangzhou_shows_that_regions_endpoint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's reproduction: a Beijing job rendered the Hangzhou endpoint, silently."""
    import argparse

    from kolors_job.launch import register_cli

    for var in ("ALIBABA_CLOUD_REGION_ID", "ALIBABACLOUD_REGION_ID"):
        monkeypatch.delenv(var, raising=False)
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    argv = ["render", "dlc", "--spec", str(SPEC), "--manifest-uri", "oss://bj-bucket/j/m.yaml", "--job-id", "j1",
            "--image", "X", "--region", "cn-beijing", "--set", "WorkspaceId=1", "--set", FILLED[2],
            "--set", "DataSources.0.Uri=oss://bj-cache.oss-cn-beijing-internal.aliyuncs.com/c/"]  # fmt: skip
    ns = p.parse_args(argv)
    assert ns.func(ns) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["Envs"]["KOLORS_JOB_OSS_ENDPOINT"] == "https://oss-cn-beijing-internal.aliyuncs.com"
    assert "hangzhou" not in json.dumps(out)
    monkeypatch.setenv("ALIBABA_CLOUD_REGION_ID", "ap-southeast-1")  # the default --region
    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    ns = p.parse_args([a for a in argv if a not in ("--region", "cn-beijing")])
    assert ns.func(ns) == 2, "a Beijing mount for a Singapore job is refused"
    assert "cn-beijing but the job runs in ap-southeast-1" in capsys.readouterr().err


# ------------------------------------------------------------------------------- loopback DLC API


class FakeDlc(FakePaiApi):
    """Records requests; answers CreateJob with a job id and GetJob with the next queued status."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses = ["Queuing", "Running", "Succeeded"]
        self.job_id = "dlc1a2b3c4d"

    def on_post(self, path: str) -> dict[str, Any]:
        return {"JobId": self.job_id, "RequestId": "req-create"}

    def on_get(self, path: str) -> dict[str, Any]:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"JobId": self.job_id, "Status": status, "ReasonCode": "", "RequestId": "req-get"}


@pytest.fixture
def fake_dlc(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDlc]:
    for var in ("ALIBABA_CLOUD_PROFILE", "ALIBABA_CLOUD_ROLE_ARN", "ALIBABA_CLOUD_OIDC_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "kolors-test-ak")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "kolors-test-secret")
    with FakeDlc() as fake:
        yield fake


def test_sdk_sends_exactly_the_built_request_and_polls_to_a_final_state(
    spec: dict[str, Any], fake_dlc: FakeDlc
) -> None:
    request = build(spec)
    client = dlc.make_client(region="cn-hangzhou", endpoint=fake_dlc.endpoint)
    assert dlc.create_job(client, request) == fake_dlc.job_id
    method, path, headers, body = fake_dlc.requests[0]
    assert (method, path) == ("POST", "/api/v1/jobs")
    assert headers["x-acs-action"] == "CreateJob" and headers["x-acs-version"] == "2020-12-03"
    assert "Credential=kolors-test-ak" in headers["Authorization"], "signed with the credential chain's key"
    assert dlc.prune(json.loads(body)) == dlc.prune(request.to_map())
    assert "kolors-test-secret" not in body.decode()
    seen: list[str] = []
    final = dlc.wait_job(client, fake_dlc.job_id, timeout=30, poll=0.01, on_change=lambda s, r: seen.append(s))
    assert final == "Succeeded" and seen == ["Queuing", "Running", "Succeeded"]
    assert fake_dlc.requests[-1][1] == f"/api/v1/jobs/{fake_dlc.job_id}"


def test_wait_job_times_out_on_a_job_that_never_ends(fake_dlc: FakeDlc) -> None:
    fake_dlc.statuses = ["Running"]
    client = dlc.make_client(region="cn-hangzhou", endpoint=fake_dlc.endpoint)
    assert dlc.wait_job(client, fake_dlc.job_id, timeout=0.2, poll=0.05) is None


def test_client_needs_a_region_or_endpoint() -> None:
    with pytest.raises(dlc.DlcSpecError):
        dlc.make_client(region=None, endpoint=None)


def test_render_dlc_prints_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from kolors_job.launch import register_cli

    p = argparse.ArgumentParser(prog="kolors-job")
    register_cli(p.add_subparsers(dest="command", required=True))
    argv = [
        "render",
        "dlc",
        "--spec",
        str(SPEC),
        "--manifest-uri",
        "oss://b/m.yaml",
        "--job-id",
        "r1",
        "--image",
        "reg/kj:1",
        "--nproc-per-node",
        "2",
    ]
    for item in FILLED:
        argv += ["--set", item]
    ns = p.parse_args(argv)
    assert ns.func(ns) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["DisplayName"] == "kolors-job-r1" and "--nproc-per-node=2" in out["UserCommand"]
    ns = p.parse_args(argv[: argv.index("--set")])
    assert ns.func(ns) == 2  # placeholders left


def test_the_aliyun_cli_env_names_sign_the_request_too(
    spec: dict[str, Any], fake_dlc: FakeDlc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ALIBABACLOUD_*`` (what configure-aliyun-credentials-action v1.0.1 exports) is a credential like
    ``ALIBABA_CLOUD_*``; the SDK alone ignores it and refuses: "accessKeyId cannot be empty"."""
    monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_ID")
    monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
    monkeypatch.setenv("ALIBABACLOUD_ACCESS_KEY_ID", "kolors-cli-ak")
    monkeypatch.setenv("ALIBABACLOUD_ACCESS_KEY_SECRET", "kolors-cli-secret")
    monkeypatch.setenv("ALIBABACLOUD_SECURITY_TOKEN", "kolors-cli-token")
    client = dlc.make_client(region="cn-hangzhou", endpoint=fake_dlc.endpoint)
    dlc.create_job(client, build(spec))
    _, _, headers, body = fake_dlc.requests[0]
    assert "Credential=kolors-cli-ak" in headers["Authorization"]
    assert headers.get("x-acs-security-token") == "kolors-cli-token"
    assert b"kolors-cli-secret" not in body
