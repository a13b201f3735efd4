"""Manifest: reference defaults, one clear line per problem, hostile inputs never crash the validator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kolors_job.core.errors import ExitCode, ManifestError
from kolors_job.manifest.load import MAX_MANIFEST_BYTES, json_schema, load_manifest, parse_manifest
from kolors_job.manifest.spec import Manifest
from kolors_job.manifest.story import Frame

MINIMAL = "spec:\n  output:\n    uri: /tmp/kolors-out\n"


def problems(text: str | bytes) -> list[str]:
    with pytest.raises(ManifestError) as e:
        parse_manifest(text)
    assert e.value.exit_code == ExitCode.INVALID_MANIFEST
    return e.value.problems


def test_minimal_manifest_reproduces_the_reference_workflow() -> None:
    m = parse_manifest(MINIMAL)
    s = m.spec
    assert s.model.base == "modelscope://Kwai-Kolors/Kolors-diffusers"
    assert s.dataset.source == "modelscope://AI-ModelScope/lowres_anime"
    assert s.dataset.caption.fixed == "二次元"
    assert (s.dataset.filters.min_width, s.dataset.filters.min_height) == (1024, 1024)
    assert s.dataset.filters.aspect_ratio == (0.5, 2.0)
    t = s.train
    assert (t.rank, t.alpha, t.learning_rate, t.steps, t.resolution, t.batch_size) == (16, 4.0, 1e-4, 500, 1024, 1)
    assert t.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (s.story.cfg_scale, s.story.steps, s.story.width, s.story.height) == (4.0, 50, 1024, 1024)
    assert [f.seed for f in s.story.frames] == [0, 1, 2, 5, 0, 1, 7, 0]
    assert s.story.frames[0].prompt.startswith("二次元，一个紫色短发小女孩")
    negs = [s.story.negative_for(f) for f in s.story.frames]
    assert negs[0] == "丑陋、变形、嘈杂、模糊、低对比度"
    assert negs[2] == "丑陋、变形、嘈杂、模糊、低对比度，色情擦边"
    assert negs[3] == "丑陋、变形、嘈杂、模糊、低对比度，扭曲的手指，多余的手指"
    assert s.recipe == "reference"  # every value above is checked against the reference's sources by
    # tests/test_reference_oracle.py; tests/test_recipe.py covers the recipes
    assert s.score.threshold == 6.0
    assert s.score.aesthetic_model.endswith("aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE")
    assert m.job_id == "kolors-lora-story"
    # watching it learn: frames 1 and 8 at every checkpoint, TensorBoard, the last step kept (the reference's)
    assert (t.validation_every, t.validation.frames, t.validation.steps) == (t.checkpoint_every, [1, 8], 20)
    assert (t.log_with, t.select) == (["tensorboard"], "last")
    off = parse_manifest(MINIMAL + "  train: {validation: {every: 0}, log_with: []}\n").spec.train
    assert (off.validation_every, off.log_with) == (0, [])


def test_json_input_and_round_trip() -> None:
    m = parse_manifest(json.dumps({"spec": {"output": {"uri": "s3://bkt/p/"}}}))
    again = parse_manifest(m.to_yaml())
    assert again == m
    assert again.digest() == m.digest()


def test_digest_ignores_output_location_but_not_work() -> None:
    a = parse_manifest(MINIMAL)
    b = parse_manifest("spec: {output: {uri: s3://other/x}}")
    c = parse_manifest("spec: {output: {uri: /tmp/x}, train: {rank: 4}}")
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spec: {output: {uri: /o}, train: {rank: -1}}", "spec.train.rank: Input should be greater than or equal to 1"),
        ("spec: {output: {uri: /o}, train: {rank: abc}}", "spec.train.rank: Input should be a valid integer"),
        ("spec: {output: {uri: /o}, train: {rnak: 4}}", "spec.train.rnak: unknown field"),
        ("spec: {output: {uri: /o}, bogus: 1}", "spec.bogus: unknown field"),
        ("spec: {output: {uri: /o}, story: {frames: [{prompt: a}]}}", "spec.story.frames: List should have at least 8"),
        ("spec: {output: {uri: ftp://h/x}}", "spec.output.uri: unsupported scheme 'ftp'"),
        ("spec: {output: {uri: modelscope://a/b}}", "spec.output.uri: unsupported scheme 'modelscope'"),
        ("spec: {output: {uri: s3://}}", "spec.output.uri: s3:// URI needs a bucket name"),
        ("spec: {output: {uri: /o}, model: {base: 'modelscope://no-slash'}}", "spec.model.base: modelscope:// URI"),
        ("spec: {}", "spec.output: required field is missing"),
        ("kind: Other\nspec: {output: {uri: /o}}", "kind: Input should be 'LoraStoryJob'"),
        ("spec: {output: {uri: /o}, train: {resolution: 1001}}", "spec.train.resolution: Input should be a multiple of 8"),
        ("spec: {output: {uri: /o}, dataset: {filters: {aspect_ratio: [2, 1]}}}", "spec.dataset.filters.aspect_ratio"),
        ("spec: {output: {uri: /o}, score: {threshold: 11}}", "spec.score.threshold: Input should be less than"),
        ("metadata: {name: 'Bad Name!'}\nspec: {output: {uri: /o}}", "metadata.name: String should match pattern"),
        ("spec: {output: {uri: /o}, train: {warmup_steps: 9, steps: 3}}", "spec.train: warmup_steps must not exceed steps"),
        ("spec: {output: {uri: /o}, train: {validation: {every: 150}}}",
         "spec.train: validation.every must be a multiple of checkpoint_every"),
        ("spec: {output: {uri: /o}, train: {select: best_aesthetic, validation: {every: 0}}}",
         "spec.train: select: best_aesthetic needs validation"),
        ("spec: {output: {uri: /o}, train: {validation: {frames: [0, 9]}}}",
         "spec: train.validation.frames: indices must be story frames 1..8"),
        ("spec: {output: {uri: /o}, train: {log_with: [mlflow]}}", "spec.train.log_with[0]: Input should be"),
        ("spec: {output: {uri: /o}, story: {frames: [{prompt: ''}, {}, {}, {}, {}, {}, {}, {}]}}",
         "spec.story.frames[0].prompt: String should have at least 1 character"),
    ],
)
def test_each_problem_is_one_line_naming_the_field(text: str, expected: str) -> None:
    lines = problems(text)
    assert any(line.startswith(expected) for line in lines), lines
    assert all("\n" not in line and "Traceback" not in line for line in lines)


def test_several_problems_give_several_lines() -> None:
    lines = problems("spec: {output: {uri: ftp://x}, train: {rank: -1, rnak: 2}}")
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "empty manifest"),
        (b"   \n# only a comment\n", "empty manifest"),
        (b"spec: [unclosed", "invalid YAML: line 1"),
        (b"spec:\n\toutput: x", "invalid YAML"),
        (b"\xff\xfe\x00bad", "not valid UTF-8"),
        (b"- a\n- b\n", "must be a mapping"),
        (b"just a string", "must be a mapping"),
        (b"a: &x [1]\nb: *x\n", "YAML aliases (*name) are not allowed"),
        (b"spec: !!python/object/apply:os.system ['echo pwned']", "invalid YAML"),
        (b"[" * 5000, "invalid YAML"),
    ],
)
def test_malformed_documents(raw: bytes, expected: str) -> None:
    lines = problems(raw)
    assert any(expected in line for line in lines), lines


def test_alias_bomb_is_refused_fast() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    assert any("aliases" in p for p in problems(bomb))


def test_oversized_manifest(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.write(b"spec: {output: {uri: /o}}\n# ")
        f.truncate(50 * 1024 * 1024)
    with pytest.raises(ManifestError, match=f"larger than the {MAX_MANIFEST_BYTES}-byte limit"):
        load_manifest(str(big))


def test_huge_string_field_is_refused() -> None:
    lines = problems("spec: {output: {uri: /o}, story: {negative_prompt: '" + "x" * 3000 + "'}}")
    assert lines[0].startswith("spec.story.negative_prompt: String should have at most 2000")


def test_sources_env_inline_then_uri_then_flag(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("metadata: {name: from-file}\nspec: {output: {uri: /o}}")
    inline = "metadata: {name: from-env}\nspec: {output: {uri: /o}}"
    assert load_manifest(environ={"KOLORS_JOB_MANIFEST": inline}).metadata.name == "from-env"
    assert load_manifest(environ={"KOLORS_JOB_MANIFEST_URI": f"file://{f}"}).metadata.name == "from-file"
    assert load_manifest(str(f), environ={"KOLORS_JOB_MANIFEST": inline}).metadata.name == "from-file"
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(environ={})
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(str(tmp_path / "missing.yaml"))


def test_credentials_in_uris_are_refused_not_echoed() -> None:
    with pytest.raises(ManifestError) as err:  # userinfo in a bucket URI: refused, and not echoed
        parse_manifest("spec: {output: {uri: 's3://AKIDSECRET:SUPERSECRETKEY@bucket/p'}}")
    assert "SUPERSECRETKEY" not in str(err.value) and "AKIDSECRET" not in str(err.value)
    assert str(err.value).startswith("spec.output.uri: s3:// URI must not carry credentials")


QUERIES = [  # (field, value): a query has no use in a storage URI; a signed URL's would become part of every key
    ("output.uri", "s3://outb/out/?token=CANARYqueryToken1"),
    ("output.uri", "oss://outb/out?X-Amz-Signature=CANARYqueryToken1"),
    ("output.uri", "file:///tmp/out?x=CANARYqueryToken1"),
    ("dataset.source", "s3://data/set/?X-Oss-Signature=CANARYqueryToken1"),
    ("model.base", "oss://models/kolors#CANARYqueryToken1"),
    ("score.aesthetic_model", "S3://models/aesthetic?v=CANARYqueryToken1"),
]


@pytest.mark.parametrize(("field", "value"), QUERIES, ids=[f"{f}={v.split(':')[0]}" for f, v in QUERIES])
def test_a_storage_uri_with_a_query_is_refused_without_echoing_it(field: str, value: str) -> None:
    section, key = field.split(".")
    doc = {"spec": {"output": {"uri": "/tmp/o"}, section: {key: value}}}
    lines = problems(json.dumps(doc))
    assert lines == [f"spec.{field}: {value.split(':')[0].lower()}:// URI must not carry a query or fragment "
                     "('?…', '#…'): storage URIs name a bucket prefix or a path (a signed URL is not one)"]
    assert "CANARY" not in "".join(lines)


# Free text carrying URLs, queries and upper-case schemes: none of it is a credential, so none of it may change.
URL_TEXT = {
    "story.negative_prompt": "blurry, a url like https://shop.example/?sale",
    "story.frames": [{"prompt": f"frame {i}: see HTTPS://Example.COM/a?b&c=&d=%41#x and S3://Bkt/K?v", "seed": i}
                     for i in range(8)],
    "dataset.caption": {"fixed": None, "prefix": "FILE://trigger?word&a=b ", "max_chars": 300},
    "dataset.source": "FILE:///data/anime",
    "model.base": "TINY://kolors",
}


def _url_manifest() -> Manifest:
    spec: dict = {"output": {"uri": "S3://bucket/Runs/"}}
    for dotted, value in URL_TEXT.items():
        section, key = dotted.split(".")
        spec.setdefault(section, {})[key] = value
    return parse_manifest(json.dumps({"spec": spec}))


def test_the_resolved_manifest_keeps_every_prompt_and_uri_byte_for_byte() -> None:
    """What ``manifest.resolved.yaml`` holds reads back as the same job (its digest is the job's own), so a
    stopped job's rerun is never taken for another manifest's (exit 6); and nothing in it was rewritten."""
    m = _url_manifest()
    text = m.to_yaml()
    again = Manifest.model_validate(yaml.safe_load(text))
    assert again.digest() == m.digest() and again.resolved() == m.resolved() == m.model_dump(mode="json")
    assert "blurry, a url like https://shop.example/?sale" in text and "?b&c=&d=%41#x" in text
    assert "FILE://trigger?word&a=b " in text and "FILE:///data/anime" in text and "S3://bucket/Runs/" in text


@pytest.mark.parametrize("text", [
    "a url with a password: https://user:CANARYpassword1@example.com/x",
    "a signed url: https://bkt.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=CANARYsig123",
    "percent-encoded: s3%3A%2F%2Fb%2Fk%3FX-Amz-Credential%3DCANARYcred%252F2024",
    "an OSS signed url: https://b.oss-cn-hangzhou.aliyuncs.com/k?OSSAccessKeyId=LTAICANARY&Signature=CANARYsig",
    "an API token: https://api.example.com/v1?access_token=CANARYtoken99",
])
def test_free_text_holding_a_credential_is_refused_in_one_line(text: str) -> None:
    """Prompts are written into prompts.json and the submission as given: one holding a credential is refused."""
    lines = problems(json.dumps({"spec": {"output": {"uri": "/o"}, "story": {"negative_prompt": text}}}))
    assert len(lines) == 1 and lines[0].startswith("spec.story.negative_prompt: holds a credential"), lines
    assert "CANARY" not in lines[0]


def test_free_text_holding_a_secret_environment_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOLORS_TEST_API_TOKEN", "CANARY-env-token-Zx81")
    doc = {"spec": {"output": {"uri": "/o"}, "dataset": {"caption": {"prefix": "CANARY-env-token-Zx81 style"}}}}
    lines = problems(json.dumps(doc))
    assert len(lines) == 1 and lines[0].startswith("spec.dataset.caption.prefix: holds a credential"), lines
    assert "CANARY" not in lines[0]


def test_json_schema_is_valid_and_rejects_unknown_fields() -> None:
    import jsonschema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(yaml.safe_load(MINIMAL)))
    assert list(validator.iter_errors({"spec": {"output": {"uri": "/o"}, "oops": 1}}))


# A property-based test: no input makes the validator raise anything but ManifestError.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)
field_names = st.sampled_from(
    ["model", "dataset", "train", "story", "score", "output", "rank", "frames", "uri", "steps", "x"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["apiVersion", "kind", "metadata", "spec", "junk"]),
        st.dictionaries(field_names, json_values, max_size=5) | json_values,
        max_size=5,
    )
)
def test_random_manifests_never_crash(data: dict) -> None:
    try:
        m = parse_manifest(json.dumps(data))
    except ManifestError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
    else:
        assert isinstance(m, Manifest)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(raw: bytes) -> None:
    try:
        parse_manifest(raw)
    except ManifestError:
        pass


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: {output: {uri: ftp://x}, train: {rank: -3}}")
    ok = subprocess.run([sys.executable, "-m", "kolors_job", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["spec"]["train"]["rank"] == 16
    err = subprocess.run([sys.executable, "-m", "kolors_job", "validate", str(bad)], capture_output=True, text=True)
    assert err.returncode == 2
    assert err.stderr.splitlines() == [
        "spec.train.rank: Input should be greater than or equal to 1",
        "spec.output.uri: unsupported scheme 'ftp'; use one of oss://, s3://, file:// or a local path",
    ]
    schema = subprocess.run([sys.executable, "-m", "kolors_job", "schema"], capture_output=True, text=True)
    assert schema.returncode == 0 and "LoraStoryJob" in schema.stdout


@pytest.mark.parametrize("name", ["minimal.yaml", "reference.yaml"])
def test_examples_validate_and_agree(name: str) -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    m = load_manifest(str(root / name))
    assert m.digest() == load_manifest(str(root / "minimal.yaml")).digest()


def test_16gb_example_differs_from_the_reference_only_in_memory_settings() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    small, ref = (load_manifest(str(root / n)).model_dump() for n in ("16gb.yaml", "minimal.yaml"))
    assert (small["spec"]["train"]["gradient_checkpointing"], small["spec"]["train"]["optimizer"]) == ("on", "adamw8bit")
    assert small["spec"]["story"]["batch_size"] == 2
    for section, keys in (("train", ("gradient_checkpointing", "optimizer")), ("story", ("batch_size",))):
        for k in keys:
            small["spec"][section][k] = ref["spec"][section][k]
    small["metadata"]["name"] = ref["metadata"]["name"]
    assert small == ref


def _properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every property of the schema and of each model in ``$defs``, as ``(Model.field, property)``."""
    found = [(f"Manifest.{k}", v) for k, v in schema.get("properties", {}).items()]
    for name, model in schema.get("$defs", {}).items():
        found += [(f"{name}.{k}", v) for k, v in (model.get("properties") or {}).items()]
    return found


def test_every_schema_property_is_described() -> None:
    """``kolors-job schema`` is the manifest's reference for editors and CI linting: no field without a word."""
    props = _properties(json_schema())
    assert len(props) > 80
    bare = [name for name, prop in props if not (prop.get("description") or "").strip()]
    assert bare == [], f"{len(bare)} of {len(props)} properties have no description: {bare}"
    described = dict(props)
    assert "(the reference: 16" in described["TrainSpec.rank"]["description"]  # the docstring, not a placeholder


def test_reference_example_is_every_default_generated_from_the_model() -> None:
    """examples/reference.yaml ("every field with its default") is exactly what the model resolves minimal.yaml to:
    no field missing (it lacked train.validation, log_with, select and spec.device), none stale."""
    root = Path(__file__).resolve().parents[1] / "examples"
    expected = load_manifest(str(root / "minimal.yaml"))
    text = (root / "reference.yaml").read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"
    assert body == expected.to_yaml(), "examples/reference.yaml is stale: run `make reference`"
    assert yaml.safe_load(text) == expected.model_dump(mode="json")
    leaves = {path for path, _ in _leaf_paths(yaml.safe_load(text))}
    for path in ("spec.train.validation.every", "spec.train.log_with", "spec.train.select", "spec.device"):
        assert path in leaves, path
    for frame in yaml.safe_load(text)["spec"]["story"]["frames"]:  # a list of Frame objects: each one whole
        assert set(frame) == set(Frame.model_fields)


def _leaf_paths(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        return [hit for k, v in node.items() for hit in _leaf_paths(v, f"{path}.{k}" if path else k)]
    return [(path, node)]


def test_dataset_may_be_one_mapping_or_a_list_of_them() -> None:
    """One dataset stays the mapping it always was (the default manifest resolves as before, with the two new
    fields filled); a list gives each dataset its own source, filters, captions, repeats and buckets."""
    one = parse_manifest(MINIMAL)
    assert isinstance(one.resolved()["spec"]["dataset"], dict)
    assert [d.source for d in one.spec.datasets] == ["modelscope://AI-ModelScope/lowres_anime"]
    assert (one.spec.dataset.repeats, one.spec.dataset.buckets) == (1, False)  # off in the reference recipe
    two = parse_manifest(
        "spec: {output: {uri: /o}, dataset: [{source: /a, repeats: 3, buckets: true},"
        " {source: /b, caption: {fixed: null}, filters: {min_width: 512, min_height: 512}}]}"
    )
    a, b = two.spec.datasets
    assert (a.source, a.repeats, a.buckets, a.filters.min_width) == ("/a", 3, True, 1024)
    assert (b.source, b.repeats, b.caption.fixed, b.filters.min_width) == ("/b", 1, None, 512)
    assert parse_manifest(two.to_yaml()).digest() == two.digest()  # the resolved list round-trips
    assert two.digest() != one.digest()
    assert problems("spec: {output: {uri: /o}, dataset: [{source: /a}, {source: /b, repets: 2}]}") == [
        "spec.dataset[1].repets: unknown field (check the spelling; see `kolors-job schema`)"
    ]
    assert problems("spec: {output: {uri: /o}, dataset: {sorce: /a}}") == [
        "spec.dataset.sorce: unknown field (check the spelling; see `kolors-job schema`)"
    ]
    assert problems("spec: {output: {uri: /o}, dataset: 3}") == [
        "spec.dataset: must be a mapping (one dataset) or a list of them"
    ]
    assert problems("spec: {output: {uri: /o}, dataset: []}") == [
        "spec.dataset: List should have at least 1 item after validation, not 0"
    ]


def test_training_options_are_off_by_default_and_validated() -> None:
    t = parse_manifest(MINIMAL).spec.train
    assert (t.loss_weighting, t.noise_offset, t.dora, t.optimizer, t.ema) == ("none", 0.0, False, "adamw", False)
    on = parse_manifest(
        "spec: {output: {uri: /o}, train: {loss_weighting: min_snr, snr_gamma: 1, noise_offset: 0.05,"
        " optimizer: prodigy, learning_rate: 1.0, ema: true, ema_decay: 0.999}}"
    ).spec.train
    assert (on.loss_weighting, on.snr_gamma, on.noise_offset, on.optimizer, on.ema_decay) == (
        "min_snr", 1.0, 0.05, "prodigy", 0.999
    )
    assert problems("spec: {output: {uri: /o}, train: {loss_weighting: snr}}") == [
        "spec.train.loss_weighting: Input should be 'none' or 'min_snr'"
    ]
    assert problems("spec: {output: {uri: /o}, train: {ema_decay: 1}}") == [
        "spec.train.ema_decay: Input should be less than 1"
    ]


def test_dora_is_refused_for_formats_that_cannot_carry_it(tmp_path: Path) -> None:
    """kohya's ``dora_scale`` is read two incompatible ways and DiffSynth drops magnitudes: named, they are
    exit 2 with the reason; left to the default, only the diffusers file remains."""
    default = parse_manifest("spec: {output: {uri: /o}, train: {dora: true}}")
    assert default.spec.output.lora_formats == ["diffusers"]
    assert parse_manifest(default.to_yaml()).digest() == default.digest()
    bad = tmp_path / "dora.yaml"
    bad.write_text("spec: {output: {uri: /o, lora_formats: [diffusers, kohya]}, train: {dora: true}}")
    err = subprocess.run([sys.executable, "-m", "kolors_job", "validate", str(bad)], capture_output=True, text=True)
    assert err.returncode == 2
    (line,) = err.stderr.splitlines()
    assert line.startswith("spec: output.lora_formats: 'kohya' cannot carry a DoRA (train.dora): ")
    assert "dora_scale" in line and "ComfyUI" in line and "diffusers" in line
    (ds,) = problems("spec: {output: {uri: /o, lora_formats: [diffsynth]}, train: {dora: true}}")
    assert "'diffsynth' cannot carry a DoRA" in ds and "strict=False" in ds
