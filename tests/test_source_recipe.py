"""A hub is three touches (docs/architecture.md, "Where to add things"): its facts in ``core/uris.HUBS``, its client
module in ``kolors_job/sources/`` (a listing and a snapshot download), its entry in ``sources/hubs.CLIENTS``.

The test makes exactly those edits to a copy of the package — a ``mirror://`` hub that speaks the Hugging Face API
at its own address (the Hugging Face emulator of ``tests/hub_servers/``) — checks nothing else changed, and in a
fresh interpreter on the copy: the manifest accepts ``mirror://OWNER/NAME`` (and refuses a malformed one by the
hub grammar), and the models stage's ``fetch_model`` lists, plans and downloads the tiny Kolors through the mirror's
client alone (``HF_ENDPOINT`` points nowhere), pinned to the repo's commit, into the cache's ``hub/mirror/``.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.hub_servers import hf_hub as hf_ids

ROOT = Path(__file__).resolve().parents[1]

CLIENT = '''\
"""The ``mirror://`` hub (a test's): the Hugging Face API at the address ``KOLORS_TEST_MIRROR_ENDPOINT`` names."""

from __future__ import annotations

import os
from pathlib import Path

from kolors_job.core.settings import Settings
from kolors_job.core.uris import HubRef

from . import huggingface
from .listing import Listing, RepoType


def _here(settings: Settings) -> Settings:
    return settings.model_copy(update={"hf_endpoint": os.environ["KOLORS_TEST_MIRROR_ENDPOINT"]})


def listing(ref: HubRef, settings: Settings, repo_type: RepoType = "model") -> Listing:
    return huggingface.listing(ref, _here(settings), repo_type)


def snapshot(ref: HubRef, repo_type: RepoType, dest: Path, patterns: list[str] | None, revision: str | None,
             settings: Settings) -> None:
    huggingface.snapshot(ref, repo_type, dest, patterns, revision, _here(settings))
'''

TOUCHES = [  # (file, text, its replacement)
    ("kolors_job/core/uris.py", '    "hf": Hub("Hugging Face", "HF_TOKEN", "main"),  # huggingface_hub.constants\n',
     '    "hf": Hub("Hugging Face", "HF_TOKEN", "main"),  # huggingface_hub.constants\n'
     '    "mirror": Hub("Mirror", "MIRROR_TOKEN", "main"),\n'),
    ("kolors_job/sources/hubs.py", "from . import huggingface, modelscope, records, transport\n",
     "from . import huggingface, mirror, modelscope, records, transport\n"),
    ("kolors_job/sources/hubs.py", '{"modelscope": modelscope, "hf": huggingface}',
     '{"modelscope": modelscope, "hf": huggingface, "mirror": mirror}'),
]

PROBE = textwrap.dedent("""
    import json, sys
    import kolors_job
    from kolors_job.core.errors import ManifestError
    from kolors_job.core.settings import Settings
    from kolors_job.manifest.load import parse_manifest
    from kolors_job.sources import fetch_model

    try:
        parse_manifest("spec: {output: {uri: /o}, model: {base: 'mirror://not-a-repo'}}")
    except ManifestError as e:
        refused = e.problems
    manifest = parse_manifest("spec: {output: {uri: /o}, model: {base: 'mirror://%s'}}")
    path, record = fetch_model(manifest.spec.model.base, kind="pipeline", settings=Settings(cache_dir=sys.argv[1]))
    print(json.dumps({"package": kolors_job.__file__, "refused": refused, "path": str(path), "record": record.to_dict()}))
""")


def test_a_hub_added_in_three_touches_serves_the_models_stage(hf_env, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "kolors_job", copy / "kolors_job", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "kolors_job/sources/mirror.py").write_text(CLIENT)
    for rel, old, new in TOUCHES:
        source = (copy / rel).read_text()
        assert source.count(old) == 1, f"{rel}: the text the touch replaces is not there once: {old!r}"
        (copy / rel).write_text(source.replace(old, new))

    changed: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        changed.extend(prefix + name for name in cmp.diff_files + cmp.left_only + cmp.right_only)
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(ROOT / "kolors_job", copy / "kolors_job", ignore=["__pycache__"]), "kolors_job/")
    assert sorted(changed) == ["kolors_job/core/uris.py", "kolors_job/sources/hubs.py", "kolors_job/sources/mirror.py"]

    env = {**os.environ, "PYTHONPATH": str(copy), "KOLORS_TEST_MIRROR_ENDPOINT": hf_env.url,
           "HF_ENDPOINT": "http://127.0.0.1:9", "KOLORS_JOB_HF_ENDPOINT": "http://127.0.0.1:9"}  # fmt: skip
    cache = tmp_path / "cache"
    res = subprocess.run([sys.executable, "-c", PROBE % hf_ids.KOLORS_ID, str(cache)], env=env, cwd=copy,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(copy)
    assert got["refused"] == ["spec.model.base: mirror:// URI must be mirror://OWNER/NAME[@REVISION]"]
    owner, name = hf_ids.KOLORS_ID.split("/")
    assert Path(got["path"]) == cache / "hub" / "mirror" / owner / name / "default"
    assert (Path(got["path"]) / "model_index.json").is_file() and (Path(got["path"]) / "unet").is_dir()
    record = got["record"]
    assert record["uri"] == f"mirror://{hf_ids.KOLORS_ID}" and record["kind"] == "pipeline"
    assert (record["commit"], record["pinned"]) == (hf_env.repo("model", hf_ids.KOLORS_ID).commit, True)
    assert record["bytes_downloaded"] == record["bytes_total"] > 0
