"""``kolors_job.sources`` against the hubs as they really answer, through the real clients and the emulators.

Per-file revisions and the one pinned commit; the transport (plain HTTP, Xet off, the job's timeouts) in
force before a client is imported; large files from a second "CDN" host with signed, expiring URLs and the
region probe; 401/403/404/429/5xx on both hubs; both dataset layouts besides parquet; the free-space check
with the dataset in it; and the shared cache: two jobs at once on a cold cache, a download killed mid-file,
a completion record checked against the listing. No whole job runs here (``test_real_hubs`` has those).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kolors_job.core.errors import ExitCode, InputError, JobError
from kolors_job.core.settings import Settings
from kolors_job.core.uris import parse_hub_uri
from kolors_job.data.scan import filter_drops, scan_dataset
from kolors_job.manifest.dataset import DatasetSpec
from kolors_job.sources import (
    check_free_space,
    fetch_dataset,
    fetch_model,
    plan_dataset,
    plan_model,
    records,
    source_record,
    transport,
)
from kolors_job.sources import hubs as hubs_module
from kolors_job.sources.hubs import list_repo
from tests.hub_servers import hf_hub as hf_ids
from tests.hub_servers import modelscope_hub as ms_ids
from tests.hub_servers.artifacts import ANIME_FOLDER_ID, ANIME_IMAGES, ANIME_NATIVE_ID, anime_text, fp16_loader_files

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", **kw)


def _file_requests(hub: Any) -> list[str]:
    return [p for m, p in hub.log.requests if m == "GET" and ("FilePath=" in p or "/resolve/" in p)]


# ------------------------------------------------------------------------------------- one commit per source


def test_modelscope_per_file_revisions_still_pin_one_repo_commit(modelscope_env, tmp_path: Path) -> None:
    """The real listing's per-file ``Revision`` (the last commit touching each file) is not the repo's commit:
    the job reads the head from ``LatestCommitter``, lists at it, and downloads every file at it."""
    hub = modelscope_env
    repo = hub.repo("model", ms_ids.PREDICTOR_ID)
    uri = f"modelscope://{ms_ids.PREDICTOR_ID}"
    settings = _settings(tmp_path)
    listing = list_repo(parse_hub_uri(uri), settings, "model")
    assert len(set(listing.file_revisions.values())) > 1  # the real shape: revisions differ per file
    assert (listing.commit, listing.pinned, listing.branch) == (repo.commit, True, "master")
    assert {f.path: f.sha256 for f in listing.files} == {p: f.sha256 for p, f in repo.files.items()}

    _, rec = fetch_model(uri, kind="aesthetic", settings=settings)
    assert (rec.commit, rec.pinned, rec.revision, rec.file_revisions) == (repo.commit, True, None, None)
    gets = _file_requests(hub)
    assert gets and all(f"Revision={repo.commit}" in p for p in gets), gets

    # a commit named in the uri is used as is
    hub.reset_downloads()
    _, rec = fetch_model(f"{uri}@{repo.commit}", kind="aesthetic", settings=settings)
    assert (rec.commit, rec.pinned, rec.revision) == (repo.commit, True, repo.commit)


def test_a_modelscope_dataset_is_pinned_to_its_commit_too(modelscope_env, tmp_path: Path) -> None:
    hub = modelscope_env
    repo = hub.repo("dataset", ms_ids.ANIME_ID)
    root = fetch_dataset(DatasetSpec(), _settings(tmp_path))
    rec = source_record(root, since=0)
    assert rec is not None
    assert (rec["commit"], rec["pinned"], rec["layout"]) == (repo.commit, True, "parquet")
    gets = _file_requests(hub)
    assert gets and all(f"Revision={repo.commit}" in p for p in gets), gets
    assert rec["bytes_downloaded"] == sum(hub.downloads(ms_ids.ANIME_ID).values()) == rec["bytes_total"]


@pytest.mark.parametrize("mode", ["blank_commit_id", "refuse_commit_revisions"])
def test_without_a_commit_to_pin_the_download_is_unpinned_and_says_so(
    modelscope_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """No usable commit (an empty ``LatestCommitter.Id``, or a hub refusing a commit as ``Revision``): the
    files come from the branch and the record says ``pinned: false``, the branch and each file's revision."""
    hub = modelscope_env
    monkeypatch.setattr(hub, mode, True)
    repo = hub.repo("model", ms_ids.PREDICTOR_ID)
    _, rec = fetch_model(f"modelscope://{ms_ids.PREDICTOR_ID}", kind="aesthetic", settings=_settings(tmp_path))
    assert rec.pinned is False and rec.revision == "master"
    assert rec.commit == (None if mode == "blank_commit_id" else repo.commit)
    assert rec.file_revisions and rec.file_revisions == {p: repo.file_commit(p)[0] for p in rec.file_revisions}
    assert "pytorch_model.bin" in rec.file_revisions
    assert all("Revision=master" in p for p in _file_requests(hub))


def test_hf_sources_are_pinned_to_the_repo_sha(hf_env, tmp_path: Path) -> None:
    hub = hf_env
    _, rec = fetch_model(f"hf://{hf_ids.PREDICTOR_ID}", kind="aesthetic", settings=_settings(tmp_path))
    commit = hub.repo("model", hf_ids.PREDICTOR_ID).commit
    assert (rec.commit, rec.pinned) == (commit, True)
    assert all(f"/resolve/{commit}/" in p for p in _file_requests(hub))


# ------------------------------------------------------------------------------------- one transport per hub


def test_the_job_transport_is_in_force_before_any_client_is_imported() -> None:
    """Whatever the environment says, a job process (the CLI, which imports the transport first) runs both
    clients with Xet off and the job's timeouts, though ``hf_xet`` is installed."""
    code = textwrap.dedent(
        """
        import importlib.util, json
        import kolors_job.cli
        import huggingface_hub.constants as hf, modelscope_hub.constants as ms
        from huggingface_hub.utils._runtime import is_xet_available
        from kolors_job.sources import transport
        print(json.dumps({"hf_xet_installed": importlib.util.find_spec("hf_xet") is not None,
                          "xet": is_xet_available(), "hf_read": hf.HF_HUB_DOWNLOAD_TIMEOUT,
                          "ms_read": ms.DOWNLOAD_TIMEOUT, "ms_retries": ms.DOWNLOAD_RETRY_TIMES,
                          "ms_total": ms.DOWNLOAD_TOTAL_TIMEOUT, "wrong": transport.check_in_force()}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_XET": "0", "HF_HUB_DOWNLOAD_TIMEOUT": "99",
           "MODELSCOPE_DOWNLOAD_TIMEOUT": "99", "KOLORS_JOB_STORAGE_READ_TIMEOUT_S": "7",
           "KOLORS_JOB_STORAGE_DEADLINE_S": "60"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # 5 tries of 7 s + 0+2+4+8 s of backoff = 49 s fit in 60 s; a sixth try would not
    assert got == {"hf_xet_installed": True, "xet": False, "hf_read": 7, "ms_read": 7, "ms_retries": 4,
                   "ms_total": transport.PER_FILE_TOTAL_S, "wrong": []}  # fmt: skip


def test_the_default_stall_bound_is_under_300_s() -> None:
    """KOLORS_JOB_STORAGE_READ_TIMEOUT_S 20 s, KOLORS_JOB_STORAGE_DEADLINE_S 240 s: ModelScope 6 tries + 30 s of
    backoff, huggingface_hub its fixed 6 tries + 5 s."""
    env = transport.client_env(Settings())
    read, retries = int(env["MODELSCOPE_DOWNLOAD_TIMEOUT"]), int(env["MODELSCOPE_DOWNLOAD_MAX_RETRIES"])
    modelscope = (retries + 1) * read + sum(transport.MODELSCOPE_RETRY_BACKOFF[:retries])
    huggingface = 6 * int(env["HF_HUB_DOWNLOAD_TIMEOUT"]) + 5
    assert (read, retries, modelscope, huggingface) == (20, 5, 150, 125)


def test_the_hf_emulator_speaks_xet_so_the_setting_decides_the_transport(hf_env, tmp_path: Path) -> None:
    """Negative control: ``huggingface_hub`` at its defaults (Xet on, ``hf_xet`` installed) reads the Xet headers
    and takes the Xet path, which fails here; with ``HF_HUB_DISABLE_XET=1`` the same file comes over HTTP."""
    code = textwrap.dedent(
        f"""
        from huggingface_hub import hf_hub_download
        print(hf_hub_download({hf_ids.PREDICTOR_ID!r}, "pytorch_model.bin", cache_dir={str(tmp_path / "hf")!r},
                              endpoint={hf_env.url!r}))
        """
    )
    runs = {}
    for xet in ("default", "disabled"):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
        if xet == "disabled":
            env["HF_HUB_DISABLE_XET"] = "1"
        runs[xet] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert runs["default"].returncode != 0 and "xet-read-token" in runs["default"].stderr
    assert runs["disabled"].returncode == 0, runs["disabled"].stderr[-2000:]


# ----------------------------------------------------------------------------- ModelScope's CDN and region probe


def test_modelscope_large_files_come_from_the_cdn_with_signed_expiring_urls(
    modelscope_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = modelscope_env
    repo = hub.repo("model", ms_ids.PREDICTOR_ID)
    signed = hub.cdn.signed
    path, _ = fetch_model(f"modelscope://{ms_ids.PREDICTOR_ID}", kind="aesthetic", settings=_settings(tmp_path))
    assert hub.cdn.signed == signed + 1  # pytorch_model.bin is the repo's one LFS file
    cdn_gets = [p for m, p in hub.log.requests if p.startswith("/hub-lfs/")]
    assert len(cdn_gets) == 1 and "Signature=" in cdn_gets[0] and "Expires=" in cdn_gets[0]
    assert (path / "pytorch_model.bin").read_bytes() == repo.files["pytorch_model.bin"].local.read_bytes()
    # the region probe, answered as the client reads it; off Alibaba Cloud no region, so no region header
    asked = {p for _, p in hub.log.requests}
    assert {"/api/v1/repos/internalAccelerationInfo", "/latest/meta-data/region-id"} <= asked
    assert hub.region_headers == []

    # a signed URL is checked and expires
    f = repo.files["pytorch_model.bin"]
    url = hub.cdn.sign(repo, f)
    assert requests.get(url, timeout=10).content == f.local.read_bytes()
    forged = requests.get(url.replace("Signature=", "Signature=x"), timeout=10)
    assert forged.status_code == 403 and b"SignatureDoesNotMatch" in forged.content
    monkeypatch.setattr(hub.cdn, "ttl_s", -1)
    expired = requests.get(hub.cdn.sign(repo, f), timeout=10)
    assert expired.status_code == 403 and b"Request has expired" in expired.content

    # on ECS the probe finds the region, and downloads ask for that region's route
    monkeypatch.setattr(hub.cdn, "ttl_s", 3600)
    monkeypatch.setattr(hub, "region", "cn-hangzhou")
    fetch_model(f"modelscope://{ms_ids.PREDICTOR_CUSTOM_ID}", kind="aesthetic", settings=_settings(tmp_path))
    assert set(hub.region_headers) == {"cn-hangzhou"}


# --------------------------------------------------------------------------------------------------- errors


ERRORS = [
    (401, ExitCode.STORAGE_DENIED, "token"),
    (403, ExitCode.STORAGE_DENIED, "request access"),
    (404, ExitCode.INVALID_INPUT, "check the repo id"),
    (429, ExitCode.TEMPORARY, "retry later"),
    (503, ExitCode.TEMPORARY, "retry later"),
]


@pytest.fixture(params=["modelscope", "hf"])
def any_hub(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, str]]:
    """(hub name, emulator with its env set, the predictor's uri on it)."""
    if request.param == "modelscope":
        yield "modelscope", request.getfixturevalue("modelscope_env"), f"modelscope://{ms_ids.PREDICTOR_ID}"
    else:
        yield "hf", request.getfixturevalue("hf_env"), f"hf://{hf_ids.PREDICTOR_ID}"


@pytest.mark.parametrize(("status", "code", "hint"), ERRORS, ids=[str(e[0]) for e in ERRORS])
def test_a_refused_listing_is_one_line_with_its_exit_code(any_hub, tmp_path: Path, status, code, hint) -> None:
    """401/403 → 5, 404 → 4, 429/5xx → retried with backoff until the storage deadline (2 s here), then 75."""
    name, hub, uri = any_hub
    settings = _settings(tmp_path, storage_deadline_s=2)
    with hub.failing(status, "listing" if name == "modelscope" else "info") as fault:
        started = time.monotonic()
        with pytest.raises(JobError) as err:
            plan_model(uri, kind="aesthetic", settings=settings, prefer_fp16=True)
        took = time.monotonic() - started
    msg = str(err.value)
    assert err.value.exit_code == code and "\n" not in msg and uri in msg and hint in msg, msg
    if status == 401:
        assert ("MODELSCOPE_API_TOKEN" if name == "modelscope" else "HF_TOKEN") in msg
    if code == ExitCode.TEMPORARY:
        assert fault.hits >= 2 and took < 30, (fault.hits, took)  # retried, and not for ever
    else:
        assert fault.hits == 1


def test_a_private_hf_repo_seen_without_a_token_says_both_causes(hf_env, tmp_path: Path) -> None:
    """Hugging Face answers 401 ``RepoNotFound`` for a private repo and a missing one alike."""
    with hf_env.failing(401, "info", error_code="RepoNotFound"), pytest.raises(JobError) as err:
        plan_model(f"hf://{hf_ids.PREDICTOR_ID}", kind="aesthetic", settings=_settings(tmp_path), prefer_fp16=True)
    assert err.value.exit_code == ExitCode.STORAGE_DENIED
    assert "no such repo, or it is private" in str(err.value) and "HF_TOKEN" in str(err.value)


@pytest.mark.parametrize(("status", "times"), [(429, 1), (503, 2)])
def test_a_file_that_fails_for_a_while_is_retried_and_arrives(any_hub, tmp_path: Path, status, times) -> None:
    """429 and 5xx on a file, on the hub or its CDN, clear after a few tries: retried with backoff (by the
    client where it does, else around it), the download completes and verifies."""
    _name, hub, uri = any_hub
    with hub.failing(status, "cdn", path="pytorch_model.bin", times=times) as fault:
        path, rec = fetch_model(uri, kind="aesthetic", settings=_settings(tmp_path))
    assert fault.hits == times
    assert rec.bytes_downloaded == rec.bytes_total
    plan = plan_model(uri, kind="aesthetic", settings=_settings(tmp_path), prefer_fp16=True)
    assert records.verify(path, plan.files) == [] and records.reusable(path, plan.files) is not None


@pytest.mark.parametrize(("status", "code"), [(403, ExitCode.STORAGE_DENIED), (404, ExitCode.INVALID_INPUT)])
def test_a_refused_file_is_its_exit_code_and_nothing_is_marked_complete(any_hub, tmp_path: Path, status, code) -> None:
    _name, hub, uri = any_hub
    settings = _settings(tmp_path)
    with hub.failing(status, "file", path="pytorch_model.bin"), pytest.raises(JobError) as err:
        fetch_model(uri, kind="aesthetic", settings=settings)
    assert err.value.exit_code == code and uri in str(err.value)
    assert not list((tmp_path / "cache").rglob(records.RECORD_NAME))


def test_the_cache_disk_and_bytes_that_contradict_the_listing_are_one_line_too() -> None:
    """The clients' own types (``modelscope_hub.errors``; ``huggingface_hub``'s size check is an ``OSError``):
    a full disk is 75 like any local fault, a read-only one 5; bytes the hub served against its own listing
    (the client already retried) 75."""
    import errno

    from modelscope_hub.errors import FileDownloadError, FileSizeMismatchError

    from kolors_job.sources.hub_errors import hub_error

    ref = parse_hub_uri(f"modelscope://{ms_ids.KOLORS_ID}")
    full = hub_error(ref, FileDownloadError("1 of 2 failed", failed_files={"x": OSError(errno.ENOSPC, "No space")}))
    assert full.exit_code == ExitCode.TEMPORARY and "No space" in str(full) and ref.uri in str(full)
    assert hub_error(ref, PermissionError(errno.EROFS, "Read-only file system")).exit_code == ExitCode.STORAGE_DENIED
    torn = FileDownloadError("1 of 2 failed", failed_files={"x": FileSizeMismatchError("Server announced 3 bytes")})
    hf_torn = OSError("Consistency check failed: file should be of size 9 but has size 3 (unet.safetensors).")
    for exc in (torn, hf_torn):
        err = hub_error(ref, exc)
        assert err.exit_code == ExitCode.TEMPORARY and "do not match its own listing" in str(err)


# --------------------------------------------------------------------------------------------- free space


def test_the_dataset_is_in_the_free_space_check(modelscope_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset's download and its export count before the first download of any source."""
    settings = _settings(tmp_path, cache_reserve_mb=0)
    model = plan_model(f"modelscope://{ms_ids.KOLORS_ID}", kind="pipeline", settings=settings, prefer_fp16=True)
    data = plan_dataset(DatasetSpec(), settings)
    assert model is not None and data is not None and data.kind == "dataset"
    assert data.export_bytes == data.bytes_total == data.needs() // 2 > 0  # the parquet, then its export
    monkeypatch.setattr(hubs_module, "_free_bytes", lambda _path: model.needs() + data.needs() - 1)
    check_free_space([model], settings)
    with pytest.raises(InputError) as err:
        check_free_space([model, None, data], settings)
    assert f"dataset 'modelscope://{ms_ids.ANIME_ID}'" in str(err.value) and "KOLORS_JOB_CACHE_DIR" in str(err.value)
    assert modelscope_env.downloads(ms_ids.KOLORS_ID) == {}


# ------------------------------------------------------------------------------------------ dataset layouts


@pytest.mark.parametrize(
    ("repo_id", "layout", "fetched"),
    [
        (ms_ids.ANIME_ID, "parquet", {"README.md", "data/train-00000-of-00002.parquet",
                                      "data/train-00001-of-00002.parquet"}),
        (ANIME_NATIVE_ID, "structure", {"lowres_anime_native.json", "train.csv", "train.zip"}),
        (ANIME_FOLDER_ID, "folder", {"train/images.zip", "train/metadata.csv"}),
    ],
)  # fmt: skip
def test_each_dataset_layout_gives_the_images_and_their_text(modelscope_env, tmp_path: Path, repo_id, layout, fetched):
    """Parquet shards, ModelScope's json + csv + archive, an image folder with an archive and a metadata file:
    the same images with their ``text`` as the caption when ``caption.fixed`` is null, and the report's
    per-filter drops."""
    spec = DatasetSpec(source=f"modelscope://{repo_id}", caption={"fixed": None})
    root = fetch_dataset(spec, _settings(tmp_path))
    assert set(modelscope_env.downloads(repo_id)) == fetched  # the split's files only
    rec = source_record(root, since=0)
    assert rec is not None and rec["layout"] == layout and rec["pinned"] is True
    scan = scan_dataset(root, spec, workers=1)
    kept = sorted(anime_text(name) for name, _, keep in ANIME_IMAGES if keep)
    assert sorted(item.caption for item in scan.items) == kept
    assert sorted((item.width, item.height) for item in scan.items) == sorted(s for _, s, k in ANIME_IMAGES if k)
    drops = filter_drops(scan.skipped_counts, spec.filters)
    assert {k: v["dropped"] for k, v in drops.items()} == {"min_size": 1, "aspect_ratio": 2, "max_pixels": 0}
    assert drops["min_size"]["setting"] == "1024x1024"


# ------------------------------------------------------------------------------------- a shared, cold cache

CHILD = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    from kolors_job.core.errors import JobError
    from kolors_job.core.settings import Settings
    from kolors_job.sources import fetch_model, plan_model, records
    settings = Settings()
    try:
        plan = plan_model(sys.argv[1], kind="pipeline", settings=settings, prefer_fp16=True)
        path, rec = fetch_model(sys.argv[1], kind="pipeline", settings=settings, plan=plan)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(int(e.exit_code))
    print(json.dumps({"path": str(path), "record": rec.to_dict(), "bad": records.verify(plan.dest, plan.files)}))
    """
)


def _start(cache: Path, tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """A process fetching Kolors into ``cache``; each has its own client cache (so the clients' own
    file locks cannot be what keeps two jobs apart)."""
    err = tmp_path / f"{name}.stderr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KOLORS_JOB_CACHE_DIR": str(cache),
           "MODELSCOPE_CACHE": str(tmp_path / f"ms-{name}")}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, f"modelscope://{ms_ids.KOLORS_ID}"],
        env=env, stdout=subprocess.PIPE, stderr=err.open("w"), text=True,
    )  # fmt: skip
    return proc, err


def _wait_for(what: str, check, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _partial(dest: Path) -> Path:
    return dest / f"{UNET}{records.PARTIAL_SUFFIX}"


def _kolors_dest(cache: Path) -> Path:
    return cache / "hub" / "modelscope" / "Kwai-Kolors" / "Kolors-diffusers" / "default"


def test_two_jobs_on_a_cold_cache_download_once_and_neither_reads_a_partial_file(
    modelscope_env, tmp_path: Path
) -> None:
    """Job A starts downloading (held half-way through the UNet); job B starts on the same cache volume,
    finds A's lock and waits; A finishes; B uses A's verified copy. Every byte went over the wire once."""
    hub = modelscope_env
    cache = tmp_path / "cache"
    size = hub.repo("model", ms_ids.KOLORS_ID).files[UNET].size
    with hub.stalled(UNET, size // 2):
        a, a_err = _start(cache, tmp_path, "a")
        _wait_for("A's partial UNet", lambda: _partial(_kolors_dest(cache)).exists() and a.poll() is None)
        b, b_err = _start(cache, tmp_path, "b")
        _wait_for("B to wait for A", lambda: "waiting for another job" in b_err.read_text() or b.poll() is not None)
        assert b.poll() is None, b_err.read_text()[-2000:]
    outs = {}
    for name, proc, err in (("a", a, a_err), ("b", b, b_err)):
        stdout, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.read_text()[-3000:]
        outs[name] = json.loads(stdout.strip().splitlines()[-1])
    assert outs["a"]["path"] == outs["b"]["path"] and outs["a"]["bad"] == outs["b"]["bad"] == []
    expected = fp16_loader_files(hub.artifacts["kolors"])
    assert hub.downloads(ms_ids.KOLORS_ID) == expected  # once: no second download, no restart of the UNet
    assert outs["a"]["record"]["bytes_downloaded"] == sum(expected.values())
    assert outs["b"]["record"]["bytes_downloaded"] == 0 and outs["b"]["record"]["bytes_reused"] == sum(expected.values())


def test_a_download_killed_mid_file_is_never_taken_as_complete_and_is_resumed(
    modelscope_env, tmp_path: Path
) -> None:
    """SIGKILL half-way through the UNet: no completion record, the partial file kept under its temporary
    name; the next job resumes it and counts only the bytes it received."""
    hub = modelscope_env
    cache = tmp_path / "cache"
    dest = _kolors_dest(cache)
    size = hub.repo("model", ms_ids.KOLORS_ID).files[UNET].size
    with hub.stalled(UNET, size // 2):
        a, _ = _start(cache, tmp_path, "a")
        _wait_for("A's partial UNet", lambda: _partial(dest).exists() and _partial(dest).stat().st_size >= size // 2)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
    assert records.read(dest) is None and not (dest / UNET).exists()
    partial = _partial(dest).stat().st_size
    assert partial == size // 2

    hub.reset_downloads()
    settings = Settings(cache_dir=cache)
    uri = f"modelscope://{ms_ids.KOLORS_ID}"
    path, rec = fetch_model(uri, kind="pipeline", settings=settings)
    sent = hub.downloads(ms_ids.KOLORS_ID)
    assert sent[UNET] == size - partial  # resumed, not restarted
    assert rec.bytes_downloaded == sum(sent.values())  # bytes actually received
    assert rec.bytes_downloaded + rec.bytes_reused == rec.bytes_total
    plan = plan_model(uri, kind="pipeline", settings=settings, prefer_fp16=True)
    assert records.verify(path, plan.files) == [] and records.reusable(path, plan.files) is not None


def test_the_completion_record_must_match_the_listing_and_the_files(modelscope_env, tmp_path: Path) -> None:
    """A copy is reused without the hub only if its record lists exactly what the hub lists now (sizes and
    digests) and every file is still the one verified: a changed file on the hub (same size) or a file
    replaced on disk (same size) is fetched again."""
    hub = modelscope_env
    repo_dir = tmp_path / "repo"
    shutil.copytree(hub.artifacts["kolors"] / "vae", repo_dir)
    (repo_dir / "README.md").write_text("a VAE\n")
    repo_id = "kolors-job-tests/vae-record"
    uri = f"modelscope://{repo_id}"
    settings = _settings(tmp_path)
    hub.add_model(repo_id, repo_dir)
    try:
        path, rec = fetch_model(uri, kind="vae", settings=settings)
        assert rec.bytes_downloaded == rec.bytes_total > 0
        hub.reset_downloads()
        assert fetch_model(uri, kind="vae", settings=settings)[1].bytes_downloaded == 0
        assert hub.downloads(repo_id) == {}

        config = repo_dir / "config.json"  # the hub's file changes, same size
        text = config.read_text()
        config.write_text(text.replace('"', "'", 1).replace("'", '"', 1).replace("  ", " \t", 1))
        assert config.stat().st_size == len(text.encode()) and config.read_text() != text
        hub.add_model(repo_id, repo_dir)
        path, rec = fetch_model(uri, kind="vae", settings=settings)
        assert hub.downloads(repo_id) == {"config.json": config.stat().st_size}
        assert rec.bytes_downloaded == config.stat().st_size and (path / "config.json").read_text() == config.read_text()

        weights = path / "diffusion_pytorch_model.fp16.safetensors"  # a file replaced on disk, same size
        weights.write_bytes(bytes(weights.stat().st_size))
        hub.reset_downloads()
        path, rec = fetch_model(uri, kind="vae", settings=settings)
        assert rec.bytes_downloaded == weights.stat().st_size
        assert weights.read_bytes() == (repo_dir / weights.name).read_bytes()
    finally:
        hub.repos.pop(("model", repo_id), None)
