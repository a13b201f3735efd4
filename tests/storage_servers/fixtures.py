"""Storage test servers, all on 127.0.0.1, started by the tests themselves.

- ``s3_server``: moto's S3 server (fast; checks no signatures, accepts wrong Content-MD5).
- ``radosgw_server``: Ceph radosgw (real SigV4, Content-MD5, If-None-Match) when
  ``KOLORS_TEST_RADOSGW=1``; needs the Debian packages named in ``radosgw.sh``.
- ``oss_server``: the OSS-protocol proxy (``oss_proxy.py``) in front of moto.
- ``s3_backend``: parametrised over moto and radosgw; ``s3_bucket_uri``/``oss_bucket_uri``: a fresh
  bucket per test; ``storage_env``: env + Settings pointing at these servers.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import oss2
import pytest
from botocore.config import Config

from kolors_job.core.settings import Settings
from kolors_job.storage.oss.settings import OSSSettings
from kolors_job.storage.s3.settings import S3Settings

from .oss_proxy import OSSProxy

RADOSGW_SCRIPT = Path(__file__).with_name("radosgw.sh")
OSS_REGION = "cn-hangzhou"


@dataclass
class S3Server:
    name: str
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, **overrides: str):
        """A raw boto3 client (for setup and for planting objects our API would refuse)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=overrides.get("access_key", self.access_key),
            aws_secret_access_key=overrides.get("secret_key", self.secret_key),
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                request_checksum_calculation="when_required",
            ),
        )

    def create_bucket(self) -> str:
        name = f"kolors-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@dataclass
class OSSServer:
    endpoint: str
    access_key: str
    secret_key: str
    proxy: OSSProxy
    backend: S3Server
    region: str = OSS_REGION
    sts: tuple[str, str, str] = ("STS.kolorsTestAk", "kolorsTestStsSecret", "kolors-test-sts-token")
    extra: dict = field(default_factory=dict)

    def raw_bucket(self, name: str, auth: oss2.AuthBase | None = None) -> oss2.Bucket:
        return oss2.Bucket(
            auth or oss2.AuthV4(self.access_key, self.secret_key),
            self.endpoint,
            name,
            region=self.region,
            enable_crc=True,
        )

    def create_bucket(self) -> str:
        return self.backend.create_bucket()  # buckets live in the S3 server behind the proxy

    def reset_faults(self) -> None:
        self.proxy.fail_next = self.proxy.corrupt_gets = self.proxy.corrupt_puts = 0


def honour_copy_source_if_match() -> None:
    """Teach moto the half of S3's conditional copy it lacks: ``x-amz-copy-source-if-match``.

    moto 5.2 checks ``x-amz-copy-source-if-none-match`` on CopyObject but ignores ``...-if-match``, which
    S3, radosgw and OSS (``x-oss-copy-source-if-match``) all honour and the output fence relies on
    (kolors_job/storage/fence.py). Its object requests are also made atomic (one lock around each), so a
    condition checked here still holds when the copy is made — as on a real store. Idempotent.
    """
    from urllib.parse import parse_qs, unquote, urlparse

    from moto.s3 import responses
    from moto.s3.exceptions import PreconditionFailed

    cls = responses.S3Response
    if getattr(cls, "_kolors_copy_if_match", False):
        return
    lock = threading.RLock()
    key_response, copy_object, upload_part_copy = cls._key_response, cls.copy_object, cls.upload_part_copy

    def check(self) -> None:
        want = self.headers.get("x-amz-copy-source-if-match")
        if want is None:
            return
        source = urlparse(self.headers.get("x-amz-copy-source", ""))
        bucket, _, key = unquote(source.path).lstrip("/").partition("/")
        version = parse_qs(source.query).get("versionId", [None])[0]
        found = self.backend.get_object(bucket, key, version_id=version)
        if found is not None and found.etag.strip('"') != want.strip('"'):
            raise PreconditionFailed("x-amz-copy-source-If-Match")

    def locked_key_response(self, *args, **kwargs):
        with lock:
            return key_response(self, *args, **kwargs)

    def checked_copy(self, *args, **kwargs):
        check(self)
        return copy_object(self, *args, **kwargs)

    def checked_part_copy(self, *args, **kwargs):
        check(self)
        return upload_part_copy(self, *args, **kwargs)

    cls._key_response, cls.copy_object, cls.upload_part_copy = locked_key_response, checked_copy, checked_part_copy
    cls._kolors_copy_if_match = True


def route_each_host_once() -> None:
    """Let moto's server find a host's service once, not for every request.

    moto 5.2's ``DomainDispatcherApplication.get_backend_for_host`` lists moto's package directory and stats its
    ~170 entries for each request (``host in backends.list_of_moto_modules()``), under the lock every request
    takes: an eighth of the pytest process's CPU while whole jobs talk to S3 (tests/README.md). Its answer
    depends on the host alone (the directory and the URL patterns do not change while the server runs), so the
    answer per host is kept. Idempotent.
    """
    from moto.moto_server import werkzeug_app

    cls = werkzeug_app.DomainDispatcherApplication
    if getattr(cls, "_kolors_routes", None) is not None:
        return
    find, routes = cls.get_backend_for_host, {}

    def get_backend_for_host(self, host):
        if host not in routes:
            routes[host] = find(self, host)
        return routes[host]

    cls.get_backend_for_host, cls._kolors_routes = get_backend_for_host, routes


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on 127.0.0.1 (conditional copies honoured: ``honour_copy_source_if_match``; each host routed
    once: ``route_each_host_once``); sets dummy AWS credentials in the env for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    honour_copy_source_if_match()
    route_each_host_once()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "kolors-moto-test-ak")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "kolors-moto-test-secret")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield S3Server("moto", f"http://{host}:{port}", "kolors-moto-test-ak", "kolors-moto-test-secret")
    server.stop()


@pytest.fixture(scope="session")
def radosgw_server(tmp_path_factory):
    """A one-node Ceph radosgw (≈15 s to start); only with KOLORS_TEST_RADOSGW=1."""
    if os.environ.get("KOLORS_TEST_RADOSGW") != "1":
        pytest.skip(
            "radosgw backend off: set KOLORS_TEST_RADOSGW=1 (needs apt packages radosgw ceph-mon "
            "ceph-osd ceph-common; see tests/storage_servers/radosgw.sh)"
        )
    workdir = tmp_path_factory.mktemp("rgw")
    proc = subprocess.run(
        ["bash", str(RADOSGW_SCRIPT), "start", str(workdir)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode:
        subprocess.run(["bash", str(RADOSGW_SCRIPT), "stop", str(workdir)], capture_output=True)
        pytest.fail(f"radosgw.sh start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    yield S3Server(
        "radosgw",
        env["RADOSGW_ENDPOINT"],
        env["RADOSGW_ACCESS_KEY"],
        env["RADOSGW_SECRET_KEY"],
        env.get("RADOSGW_REGION", "us-east-1"),
    )
    subprocess.run(["bash", str(RADOSGW_SCRIPT), "stop", str(workdir)], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def oss_server(s3_server):
    """The OSS proxy in front of moto; accepts one AK/SK pair and one STS triple."""
    ak, sk = "LTAIkolorsTestAccessKey", "kolorsTestOssSecretKey0123456789"
    sts = OSSServer.sts
    proxy = OSSProxy(s3_server.endpoint_url, {ak: (sk, ""), sts[0]: (sts[1], sts[2])}).start()
    yield OSSServer(proxy.endpoint, ak, sk, proxy, s3_server)
    proxy.stop()


@pytest.fixture(params=["moto", "radosgw"])
def s3_backend(request) -> S3Server:
    return request.getfixturevalue("s3_server" if request.param == "moto" else "radosgw_server")


def s3_settings(endpoint: str, region: str) -> S3Settings:
    """The S3 backend's settings for a loopback server (path-style: no virtual-host buckets on 127.0.0.1)."""
    return S3Settings(endpoint_url=endpoint, region=region, addressing_style="path")


def pointed(settings: Settings, scheme: str, endpoint: str, **update: object) -> Settings:
    """``settings`` with the ``scheme`` backend's endpoint replaced (a fault proxy, a dead port), and ``update``."""
    own = settings.backends[scheme]
    field = "endpoint_url" if scheme == "s3" else "endpoint"
    backends = {**settings.backends, scheme: own.model_copy(update={field: endpoint})}
    return settings.model_copy(update={"backends": backends, **update})


def apply_storage_env(mp: pytest.MonkeyPatch, cache_dir: Path, s3: S3Server, oss: OSSServer) -> Settings:
    """Point env + Settings at the test servers, hiding any real credentials/profiles."""
    for var in list(os.environ):
        if var.startswith(("AWS_", "OSS_", "ALIBABA_CLOUD_")):
            mp.delenv(var)
    mp.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    mp.setenv("AWS_CONFIG_FILE", str(cache_dir / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(cache_dir / "no-aws-credentials"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("OSS_ACCESS_KEY_ID", oss.access_key)
    mp.setenv("OSS_ACCESS_KEY_SECRET", oss.secret_key)
    oss.reset_faults()
    return Settings(
        cache_dir=cache_dir,
        backends={"s3": s3_settings(s3.endpoint_url, s3.region), "oss": OSSSettings(endpoint=oss.endpoint, region=oss.region)},
        storage_max_attempts=3,
        multipart_threshold_mb=8,
        multipart_chunk_mb=5,
    )


@pytest.fixture
def storage_env(request, monkeypatch, tmp_path, oss_server) -> Settings:
    """Settings + env for the test servers (the S3 one is ``s3_backend`` if the test uses it, else moto)."""
    s3 = request.getfixturevalue("s3_backend" if "s3_backend" in request.fixturenames else "s3_server")
    return apply_storage_env(monkeypatch, tmp_path / "cache", s3, oss_server)


@pytest.fixture
def s3_bucket_uri(s3_backend, storage_env) -> str:
    """``s3://<fresh bucket>/`` on each S3 backend; ``storage_env`` points at it."""
    return f"s3://{s3_backend.create_bucket()}/"


@pytest.fixture
def oss_bucket_uri(oss_server, storage_env) -> str:
    """``oss://<fresh bucket>/`` behind the OSS proxy; ``storage_env`` points at it."""
    return f"oss://{oss_server.create_bucket()}/"


__all__ = [
    "oss_bucket_uri",
    "oss_server",
    "radosgw_server",
    "s3_backend",
    "s3_bucket_uri",
    "s3_server",
    "storage_env",
]
