"""Which OSS endpoint a launched job should use: the one of the region it runs in.

A job inside Alibaba Cloud (PAI-DLC, ACK) reads its buckets through the region's *internal* endpoint
(``oss-<region>-internal.aliyuncs.com``: no traffic charge, and the only one a VPC without internet
reaches). An internal endpoint of another region is unreachable, so a Beijing job rendered with a
Hangzhou endpoint fails at its first read: the launchers derive the endpoint from the region instead
of carrying a fixed one, and an endpoint set explicitly still wins.
"""

from __future__ import annotations

import re

ENDPOINT_ENVS = ("KOLORS_JOB_OSS_ENDPOINT", "OSS_ENDPOINT", "KOLORS_JOB_OSS_REGION")
"""Env names that already tell the job where OSS is: any of them set explicitly wins over the region."""
REGION_RE = re.compile(r"^[a-z]{2,}(?:-[a-z0-9]+)+$")
"""An Alibaba Cloud region id: ``cn-beijing``, ``ap-southeast-1``, ``eu-central-1``, ``cn-hongkong``."""
_HOST_REGION = re.compile(r"(?:^|[/.@])oss-([a-z0-9-]+?)(-internal)?\.aliyuncs\.com(?:[/:]|$)")


def internal_endpoint(region: str) -> str:
    """``https://oss-<region>-internal.aliyuncs.com``; a malformed region is a ``ValueError`` naming it."""
    if not REGION_RE.match(region or ""):
        raise ValueError(f"region {region!r} is not an Alibaba Cloud region id like cn-beijing or ap-southeast-1")
    return f"https://oss-{region}-internal.aliyuncs.com"


def endpoint_region(text: str) -> tuple[str, bool] | None:
    """``(region, internal)`` named by an OSS endpoint or an endpoint-style URI
    (``oss://bkt.oss-cn-beijing-internal.aliyuncs.com/p/``, ``https://oss-cn-beijing.aliyuncs.com``); else None."""
    m = _HOST_REGION.search(text or "")
    return (m.group(1), bool(m.group(2))) if m else None
