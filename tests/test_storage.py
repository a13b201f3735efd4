"""Storage layer against real servers on 127.0.0.1: a local dir, moto S3 (+ radosgw when enabled) and
an OSS-protocol proxy (signature checks, CRC64, fault injection) in front of moto. No SDK mocks."""

from __future__ import annotations

import hashlib
import os
import socket
import traceback
from pathlib import Path

import oss2
import pytest
from alibabacloud_credentials.client import Client as AlibabaCredentialsClient
from alibabacloud_credentials.provider import StaticSTSCredentialsProvider
from hypothesis import given
from hypothesis import strategies as hst

from kolors_job.core.errors import StorageDeniedError, StorageError, StorageNotFoundError, StorageTemporaryError
from kolors_job.storage import Store, is_bucket_uri, open_store, redact, split_uri
from kolors_job.storage.base import unsafe_relative_path
from kolors_job.storage.local import LocalStore
from kolors_job.storage.oss import credentials as oss_credentials
from kolors_job.storage.oss import store as oss_mod

try:
    from tests.storage_servers.fixtures import pointed
except ModuleNotFoundError:  # tests/ not importable as a package
    from storage_servers.fixtures import pointed

BACKENDS = pytest.mark.parametrize(
    ("kind", "s3_backend"),
    [
        ("file", "moto"),
        ("s3", "moto"),
        pytest.param("s3", "radosgw", marks=pytest.mark.radosgw),
        ("oss", "moto"),
    ],
    ids=["file", "s3-moto", "s3-radosgw", "oss"],
    indirect=["s3_backend"],
)
REMOTE = pytest.mark.parametrize(
    ("kind", "s3_backend"),
    [("s3", "moto"), pytest.param("s3", "radosgw", marks=pytest.mark.radosgw), ("oss", "moto")],
    ids=["s3-moto", "s3-radosgw", "oss"],
    indirect=["s3_backend"],
)


@pytest.fixture
def store(kind, s3_backend, request, storage_env, tmp_path) -> Store:
    """A store under a 'root/' prefix (so prefix handling is exercised) on the requested backend."""
    if kind == "file":
        return open_store(str(tmp_path / "store"), storage_env)
    bucket_uri = request.getfixturevalue("s3_bucket_uri" if kind == "s3" else "oss_bucket_uri")
    return open_store(bucket_uri + "root/", storage_env)


def plant(kind, s3_backend, oss_server, store: Store, key: str, data: bytes = b"x") -> None:
    """Write an object with the raw SDK, bypassing our key checks (hostile keys)."""
    if kind == "file":
        path = store.local_path() / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    _, bucket, prefix = split_uri(store.uri)
    server = s3_backend if kind == "s3" else oss_server.backend
    server.client().put_object(Bucket=bucket, Key=prefix + key, Body=data)


def assert_no_secrets(exc: BaseException, *secrets: str) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc)
    for secret in secrets:
        assert secret not in text


# -- URIs ----------------------------------------------------------------------------------------
def test_split_uri_and_open_store(tmp_path, storage_env):
    assert split_uri("s3://bkt/a/b") == ("s3", "bkt", "a/b/")
    assert split_uri("oss://bkt") == ("oss", "bkt", "")
    assert split_uri("OSS://bkt/x/") == ("oss", "bkt", "x/")
    assert split_uri(f"file://{tmp_path}/d") == ("file", "", f"{tmp_path}/d/")
    assert split_uri(str(tmp_path)) == ("file", "", f"{tmp_path}/")
    assert (
        is_bucket_uri("s3://b/")
        and is_bucket_uri("oss://b/p")
        and not is_bucket_uri("rel/dir")
        and not is_bucket_uri("file:///x")
    )
    with pytest.raises(ValueError, match=r"unsupported storage URI scheme 'gs'") as err:
        split_uri("gs://bucket/x")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs a bucket name"):
        split_uri("s3:///x")
    with pytest.raises(ValueError, match="host"):
        split_uri("file://otherhost/x")

    local = open_store(str(tmp_path / "out"), storage_env)
    assert isinstance(local, LocalStore) and local.local_path() == tmp_path / "out"
    assert local.uri == (tmp_path / "out").as_uri() + "/"
    assert open_store((tmp_path / "out").as_uri(), storage_env).uri == local.uri
    child = local.child("job-1", "lora")
    assert child.uri == local.uri + "job-1/lora/" and child.local_path() == tmp_path / "out/job-1/lora"
    s3 = open_store("s3://bkt/jobs", storage_env)
    assert (
        s3.uri == "s3://bkt/jobs/" and s3.child("j1/").uri == "s3://bkt/jobs/j1/" and s3.local_path() is None
    )
    oss = open_store("oss://bkt/jobs/", storage_env)
    assert oss.child("a", "b").uri == "oss://bkt/jobs/a/b/"
    for st in (s3, oss):
        assert repr(st) == f"{type(st).__name__}({st.uri!r})"
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in repr(st) + repr(vars(st))
        assert os.environ["OSS_ACCESS_KEY_SECRET"] not in repr(st)


def test_redact_userinfo():
    assert redact("connect to https://AKID:s3cr3t@oss.example.com/x failed") == (
        "connect to https://***@oss.example.com/x failed"
    )
    assert redact("http://127.0.0.1:9000/b") == "http://127.0.0.1:9000/b"


@given(hst.text(alphabet=list("ab./\\\x00:C~ "), max_size=12))
def test_accepted_relative_paths_stay_inside(rel):
    try:
        unsafe_relative_path(rel)
    except StorageError as exc:
        assert repr(rel) in str(exc)
        return
    target = os.path.normpath(Path("/base").joinpath(*rel.split("/")))
    assert target.startswith("/base/") and "\x00" not in target and "\\" not in target


# -- the contract, on every backend -------------------------------------------------------------
@BACKENDS
def test_directory_roundtrip_byte_for_byte(store, kind, tmp_path):
    src = tmp_path / "src"
    files = {
        "a.txt": b"hello\n",
        "sub/b.bin": os.urandom(4096),
        "sub/deep/empty": b"",
        "图像 01.png": os.urandom(100),
        "big.bin": os.urandom(21 * 1024 * 1024),  # > multipart threshold (8 MiB in storage_env): 5 parts
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)

    keys = store.upload_dir(src, "run")
    assert keys == sorted(f"run/{rel}" for rel in files)
    assert store.list("run/") == keys
    assert store.child("run").list() == sorted(files)

    dst = tmp_path / "dst"
    paths = store.download_dir("run", dst)
    assert sorted(p.relative_to(dst).as_posix() for p in paths) == sorted(files)
    for rel, data in files.items():
        got = (dst / rel).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), rel
    assert not [p for p in dst.rglob("*") if ".kolors-tmp-" in p.name]

    if kind == "s3":  # really multipart: S3 ETags of multipart objects end in -<parts>
        head = store._client.head_object(Bucket=store.bucket, Key=store.prefix + "run/big.bin")
        assert head["ETag"].strip('"').endswith("-5")
    elif kind == "oss":
        assert store._bucket.head_object(store.prefix + "run/big.bin").object_type == "Multipart"
        # the resumable checkpoint is removed once the upload completed
        checkpoints = store.settings.cache_dir / "oss-checkpoints"
        assert checkpoints.is_dir() and not list(checkpoints.iterdir())


@BACKENDS
def test_bytes_text_exists_delete_notfound(store, tmp_path):
    assert not store.exists("x/y.json")
    assert store.write_text("x/y.json", '{"a": "紫色"}') is True
    assert store.exists("x/y.json")
    assert store.read_text("x/y.json") == '{"a": "紫色"}'
    assert store.write_bytes("x/y.json", b"v2") is True
    assert store.read_bytes("x/y.json") == b"v2"
    assert not store.exists("x/y")  # a prefix of a key is not a key
    store.delete("x/y.json")
    store.delete("x/y.json")  # missing is fine
    assert not store.exists("x/y.json")
    with pytest.raises(StorageNotFoundError, match=r"x/y\.json"):
        store.read_bytes("x/y.json")
    with pytest.raises(StorageNotFoundError):
        store.download_file("x/y.json", tmp_path / "never" / "f")
    assert not (tmp_path / "never" / "f").exists()
    for bad in ("../up", "/abs", "a//b", "a\\b", "nul\x00", ""):
        with pytest.raises(StorageError):
            store.write_bytes(bad, b"x")


@BACKENDS
def test_if_absent_is_a_conditional_create(store):
    assert store.write_bytes("lock", b"first", if_absent=True) is True
    assert store.write_bytes("lock", b"second", if_absent=True) is False
    assert store.write_text("lock", "third", if_absent=True) is False
    assert store.read_bytes("lock") == b"first"
    assert store.list() == ["lock"]


@BACKENDS
def test_list_is_recursive_sorted_and_pages(store, kind, oss_server):
    names = [f"p/{i:02d}" for i in range(11)] + ["p/sub/z", "q", "pp"]
    for name in reversed(names):
        store.write_bytes(name, b".")
    calls = []
    if kind == "s3":
        store._client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    oss_seen = len(oss_server.proxy.requests)
    store.page_size = 3
    assert store.list("p/") == sorted(n for n in names if n.startswith("p/"))
    assert store.list("p") == sorted(n for n in names if n.startswith("p"))
    assert store.list() == sorted(names)
    assert store.list("nothing/") == []
    if kind == "s3":
        assert len(calls) >= 5  # 12 keys / 3 per page
    elif kind == "oss":
        lists = [r for _, r in oss_server.proxy.requests[oss_seen:] if "list-type=2" in r]
        assert len(lists) >= 5


@BACKENDS
@pytest.mark.parametrize("hostile", ["../evil", "/abs", "a/../../evil", "..\\evil", "nul\x00byte"])
def test_download_dir_refuses_escaping_keys(store, kind, s3_backend, oss_server, tmp_path, hostile):
    if kind == "file" and ("\x00" in hostile or hostile.startswith("/") or ".." in hostile.split("/")):
        pytest.skip("a filesystem cannot hold this name")
    if s3_backend.name == "radosgw" and "\x00" in hostile:
        pytest.skip("radosgw rejects NUL in keys itself")
    plant(kind, s3_backend, oss_server, store, "dl/!good.txt")  # sorts first: must not be written either
    plant(kind, s3_backend, oss_server, store, "dl/" + hostile)
    assert "dl/" + hostile in store.list("dl/")
    target = tmp_path / "target" / "inner"
    with pytest.raises(StorageError) as err:
        store.download_dir("dl", target)
    assert repr(hostile)[1:-1] in str(err.value)
    assert not target.exists()  # nothing written, not even the good key
    assert not (tmp_path / "target" / "evil").exists() and not (tmp_path / "evil").exists()


# -- errors and credentials -------------------------------------------------------------------
@REMOTE
def test_missing_bucket_is_denied(kind, s3_backend, storage_env):
    st = open_store(f"{kind}://kolors-no-such-bucket-{os.getpid()}/p/", storage_env)
    for op in (
        lambda: st.read_bytes("k"),
        lambda: st.exists("k"),
        lambda: st.write_bytes("k", b"1"),
        lambda: st.list(),
        lambda: st.delete("k"),
    ):
        with pytest.raises(StorageDeniedError, match="NoSuchBucket") as err:
            op()
        assert "kolors-no-such-bucket" in str(err.value)


def test_s3_clients_share_the_parsed_service_model_and_read_their_credentials_each(
    s3_bucket_uri, storage_env, monkeypatch, tmp_path
):
    """Every S3 client reads its credentials from the environment as it is when its store opens, while botocore's
    data loader (the parsed service model, ~60 ms a client) is the process's one; ``AWS_DATA_PATH`` gets its own,
    and the loader's search path does not grow with each session boto3 makes."""
    from kolors_job.storage.s3 import client as s3_client

    clients = []
    with monkeypatch.context() as env:
        for key in ("AKIAKOLORSFIRSTKEY01", "AKIAKOLORSSECONDKEY2"):
            env.setenv("AWS_ACCESS_KEY_ID", key)
            clients.append(s3_client.make_client(storage_env))
        assert [c._request_signer._credentials.access_key for c in clients] == ["AKIAKOLORSFIRSTKEY01",
                                                                               "AKIAKOLORSSECONDKEY2"]
        assert clients[0]._loader is clients[1]._loader is s3_client._LOADERS[None]
        paths = list(clients[0]._loader.search_paths)
        assert len(paths) == len(set(paths))
        env.setenv("AWS_DATA_PATH", str(tmp_path))
        own = s3_client.make_client(storage_env)
        assert own._loader is not clients[0]._loader and str(tmp_path) in own._loader.search_paths
        assert clients[0]._loader.search_paths == paths
    # the server's own credentials again (radosgw checks signatures): a store on the shared loader speaks S3
    st = open_store(s3_bucket_uri, storage_env)
    st.write_bytes("loader/k", b"bytes")
    assert st.read_bytes("loader/k") == b"bytes"


@pytest.mark.radosgw
@pytest.mark.parametrize("s3_backend", ["radosgw"], indirect=True)
def test_s3_wrong_secret_is_denied_radosgw(s3_bucket_uri, storage_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    st = open_store(s3_bucket_uri, storage_env)
    with pytest.raises(StorageDeniedError, match="SignatureDoesNotMatch") as err:
        st.write_bytes("k", b"1")
    assert_no_secrets(err.value, "definitely-wrong-secret", os.environ["AWS_ACCESS_KEY_ID"])


@pytest.mark.parametrize("region", ["cn-hangzhou", None], ids=["v4", "v1"])
def test_oss_signatures_checked(oss_bucket_uri, storage_env, oss_server, monkeypatch, region):
    oss = storage_env.backends["oss"].model_copy(update={"region": region})
    settings = storage_env.model_copy(update={"backends": {**storage_env.backends, "oss": oss}})
    st = open_store(oss_bucket_uri, settings)
    assert type(st._bucket.auth) is (oss2.ProviderAuthV4 if region else oss2.ProviderAuth)
    assert st.write_bytes("ok", b"1")  # the right key signs correctly

    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "wrong-oss-secret-123")
    with pytest.raises(StorageDeniedError, match="SignatureDoesNotMatch") as err:
        open_store(oss_bucket_uri, settings).read_bytes("ok")
    # the proxy's error (like OSS's) carries AccessKeyId + StringToSign: none of it may leak
    assert_no_secrets(err.value, "wrong-oss-secret-123", oss_server.access_key, "StringToSign", "OSS4-HMAC")

    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "LTAIunknownKey")
    with pytest.raises(StorageDeniedError, match="InvalidAccessKeyId") as err:
        open_store(oss_bucket_uri, settings).list()
    assert_no_secrets(err.value, "LTAIunknownKey", "wrong-oss-secret-123")


def test_oss_sts_credentials_via_alibabacloud_chain_and_env(
    oss_bucket_uri, storage_env, oss_server, monkeypatch
):
    ak, sk, token = oss_server.sts
    _, bucket, prefix = split_uri(oss_bucket_uri)
    client = AlibabaCredentialsClient(
        provider=StaticSTSCredentialsProvider(access_key_id=ak, access_key_secret=sk, security_token=token)
    )
    provider = oss_credentials._AlibabaChainProvider(client)
    st = oss_mod.OSSStore(bucket, prefix, storage_env, oss_mod.make_bucket(bucket, storage_env, provider))
    assert st.write_bytes("sts", b"via chain") and st.read_bytes("sts") == b"via chain"

    for var in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", ak)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", sk)
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", token)
    assert open_store(oss_bucket_uri, storage_env).read_bytes("sts") == b"via chain"
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", "stale-token")
    with pytest.raises(StorageDeniedError, match="InvalidSecurityToken") as err:
        open_store(oss_bucket_uri, storage_env).read_bytes("sts")
    assert_no_secrets(err.value, sk, "stale-token", token)


def test_oss_anonymous_without_credentials(oss_bucket_uri, storage_env, monkeypatch):
    for var in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"):
        monkeypatch.delenv(var)
    monkeypatch.setattr(oss_credentials, "default_chain_provider", lambda: None)  # no RRSA/ECS/profile here
    monkeypatch.setattr(oss_credentials, "DLC_CREDENTIALS_FILE", Path("/nonexistent/credentials"))
    st = open_store(oss_bucket_uri, storage_env)
    assert isinstance(st._bucket.auth, oss2.AnonymousAuth)
    with pytest.raises(StorageDeniedError, match="AccessDenied"):
        st.read_bytes("k")


def test_oss_dlc_credentials_file_is_reread(oss_bucket_uri, storage_env, oss_server, monkeypatch, tmp_path):
    ak, sk, token = oss_server.sts
    creds = tmp_path / "credentials"
    creds.write_text(f'{{"AccessKeyId": "{ak}", "AccessKeySecret": "{sk}", "SecurityToken": "{token}"}}')
    for var in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"):
        monkeypatch.delenv(var)
    monkeypatch.setattr(oss_credentials, "DLC_CREDENTIALS_FILE", creds)
    st = open_store(oss_bucket_uri, storage_env)
    assert st.write_bytes("dlc", b"1")
    creds.write_text(f'{{"AccessKeyId": "{ak}", "AccessKeySecret": "{sk}", "SecurityToken": "rotated-bad"}}')
    os.utime(creds, (1, 1))  # mtime changes even within the same second
    with pytest.raises(StorageDeniedError, match="InvalidSecurityToken"):
        st.read_bytes("dlc")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_unreachable_endpoint_is_temporary_and_redacted(kind, storage_env):
    endpoint = f"http://user:topsecretpw@127.0.0.1:{_closed_port()}"
    settings = pointed(storage_env, kind, endpoint, storage_max_attempts=2)
    st = open_store(f"{kind}://bkt/p/", settings)
    if kind == "oss":
        st.retry_base_delay = 0.01
    with pytest.raises(StorageTemporaryError) as err:
        st.read_bytes("k")
    assert_no_secrets(err.value, "topsecretpw")


# -- OSS integrity and retries ------------------------------------------------------------------
def test_oss_crc64_mismatch_on_read_is_detected_and_retried(
    oss_bucket_uri, storage_env, oss_server, tmp_path
):
    st = open_store(oss_bucket_uri, storage_env)
    st.retry_base_delay = 0.001
    data = os.urandom(50_000)
    st.write_bytes("obj", data)
    oss_server.proxy.corrupt_gets = 1  # one corrupted body: the retry gets a good one
    assert st.read_bytes("obj") == data
    assert oss_server.proxy.corrupt_gets == 0
    oss_server.proxy.corrupt_gets = 10  # every attempt corrupted: give up, never return bad bytes
    with pytest.raises(StorageTemporaryError, match="CRC64"):
        st.read_bytes("obj")
    oss_server.proxy.corrupt_gets = 10
    with pytest.raises(StorageTemporaryError, match="CRC64"):
        st.download_file("obj", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    # raw oss2 agrees: the proxy's CRC header really is checked
    oss_server.proxy.corrupt_gets = 1
    with pytest.raises(oss2.exceptions.InconsistentError):
        oss_server.raw_bucket(split_uri(oss_bucket_uri)[1]).get_object_to_file("obj", str(tmp_path / "raw"))
    oss_server.reset_faults()


def test_oss_crc64_mismatch_on_upload_is_detected_and_retried(
    oss_bucket_uri, storage_env, oss_server, tmp_path
):
    st = open_store(oss_bucket_uri, storage_env)
    st.retry_base_delay = 0.001
    oss_server.proxy.corrupt_puts = 1
    assert st.write_bytes("small", b"payload")
    assert st.read_bytes("small") == b"payload"  # the retry replaced the corrupted object
    oss_server.proxy.corrupt_puts = 10
    with pytest.raises(StorageTemporaryError, match="CRC64"):
        st.write_bytes("small2", b"payload")

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))  # 3 parts of 5 MiB
    oss_server.proxy.corrupt_puts = 1  # one part corrupted: the retry resumes from the checkpoint
    st.upload_file("big", big)
    assert oss_server.proxy.corrupt_puts == 0
    st.download_file("big", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    oss_server.reset_faults()


def test_oss_transient_errors_retry_with_bounded_backoff(oss_bucket_uri, storage_env, oss_server):
    st = open_store(oss_bucket_uri, storage_env.model_copy(update={"storage_max_attempts": 4}))
    st.retry_base_delay, st.retry_max_delay = 0.5, 1.0
    sleeps: list[float] = []
    st._sleep = sleeps.append
    oss_server.proxy.fail_next = 3
    assert st.write_bytes("k", b"v")
    assert len(sleeps) == 3 and all(0 <= s <= cap for s, cap in zip(sleeps, (0.5, 1.0, 1.0), strict=True))
    sleeps.clear()
    oss_server.proxy.fail_next = 10
    with pytest.raises(StorageTemporaryError, match="ServiceUnavailable"):
        st.read_bytes("k")
    assert len(sleeps) == 3  # 4 attempts, then give up
    oss_server.reset_faults()
    sleeps.clear()
    with pytest.raises(StorageNotFoundError):  # permanent errors are not retried
        st.read_bytes("missing")
    assert sleeps == []


# -- local specifics ---------------------------------------------------------------------------
def test_local_store_is_atomic_and_confined(tmp_path):
    st = open_store(f"file://{tmp_path}/root")
    st.write_bytes("a/b", b"1")
    (tmp_path / "root/a/.b.kolors-tmp-123").write_bytes(b"partial")  # a writer in progress
    assert st.list() == ["a/b"]
    with pytest.raises(StorageError, match=r"\.\./x"):
        st.read_bytes("../x")
    with pytest.raises(StorageError):
        st.list("../")
    src = tmp_path / "f"
    src.write_bytes(b"data")
    st.upload_file("c/d", src)
    assert (tmp_path / "root/c/d").read_bytes() == b"data"
    assert st.child("c").list() == ["d"]
