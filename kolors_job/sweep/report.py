"""``kolors-job sweep report <prefix>``: rank a sweep's trials from their outputs and publish the winner.

Storage only, no cluster: every ``<prefix>/<trial>/`` directory is read (``status.json``, ``report.json``,
``manifest.resolved.yaml`` for the ``--set`` values, ``_claim/`` for liveness). A trial is

- **succeeded**: finished and above the quality gate; ranked by the objective (the sweep's weighted sum);
- **failed-gate**: finished under the gate (exit 3, or ``score.passed: false``): its score is shown, but it is
  never ranked above a passing trial — failed-gate, not zero;
- **running**: no final status yet and its output claim still has a live heartbeat;
- **crashed**: no final status and no live claim (killed: out of memory, node lost, early-stopped by the engine);
- **interrupted** (exit 75, resumable) or **failed** (any other exit code).

It writes ``sweep.json`` and ``sweep.html`` (a table, each parameter against the objective, the top three
stories' frames) and publishes the best trial's LoRA files, report and story to ``<prefix>/best/`` with
``BEST.json`` (its trial, score, parameters and every file's SHA-256). ``best/_SUCCESS`` is removed before
anything of a new winner is written and written after all of it (the repository's marker rule), so a reader
that sees ``_SUCCESS`` sees one trial's complete set and can check each file against ``BEST.json``. Reruns are
idempotent: nothing that already holds the same bytes is written again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from kolors_job.core.errors import ExitCode, StorageNotFoundError
from kolors_job.core.redact import redact_uri
from kolors_job.job.claim import CLAIM_DIR, ClaimRecord
from kolors_job.sweep.metrics import DEFAULT_WEIGHTS, objective
from kolors_job.sweep.overrides import SET_LABEL, recorded
from kolors_job.sweep.trial import OBJECTIVE_LABEL

BEST = "best"
BEST_POINTER = "BEST.json"
MARKER = "_SUCCESS"
STATE_ORDER = ("succeeded", "failed-gate", "running", "interrupted", "failed", "crashed", "unknown")
BEST_FILES = ("report.json", "report.html", "story.jpg", "prompts.json")
BEST_DIRS = ("lora/", "images/")
THUMB = 160


@dataclass
class Trial:
    name: str
    state: str
    detail: str = ""
    objective: float | None = None
    mean_aesthetic: float | None = None
    consistency: float | None = None
    threshold: float | None = None
    params: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    steps: int | None = None
    seconds: float | None = None
    """The run's wall time, its stages together (what one trial costs on its GPUs)."""
    device: str | None = None
    frames: list[str] = field(default_factory=list)
    rank: int | None = None

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "frames"}


@dataclass
class SweepResult:
    prefix: str
    trials: list[Trial]
    best: Trial | None
    weights: dict[str, float]
    written: list[str]


# ------------------------------------------------------------------------------------------ reading


def _json(store: Any, key: str) -> Any:
    try:
        return json.loads(store.read_bytes(key))
    except StorageNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # half-written (a local file caught mid-write) or not ours


def _claim_live(store: Any, now: float) -> tuple[bool, float | None]:
    """Whether the trial's output claim (:mod:`kolors_job.job.claim`) is held by a live run; its last heartbeat."""
    gens = sorted(k for k in store.list(f"{CLAIM_DIR}/") if k.rsplit("/", 1)[-1].removesuffix(".json").isdigit())
    if not gens:
        return False, None
    doc = _json(store, gens[-1])
    try:
        record = ClaimRecord(**{k: doc[k] for k in ClaimRecord.__dataclass_fields__ if k in doc})
    except (TypeError, KeyError):
        return False, None
    return record.live(now), record.heartbeat


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def read_trial(store: Any, name: str, weights: Mapping[str, float], now: float) -> Trial:
    status = _json(store, "status.json") or {}
    report = _json(store, "report.json") or {}
    resolved = _manifest(store) or report.get("manifest") or {}
    labels = (resolved.get("metadata") or {}).get("labels") or {}
    score = report.get("score") or {}
    trial = Trial(name=name, state="unknown", params=recorded(labels))
    trial.mean_aesthetic = _number(score.get("mean"))
    trial.consistency = _number(score.get("consistency"))
    trial.threshold = _number(score.get("threshold"))
    trial.exit_code = status.get("exit_code") if isinstance(status.get("exit_code"), int) else None
    trial.steps = (report.get("train") or {}).get("steps")
    timings = report.get("timings") or {}
    trial.seconds = round(sum(v for v in timings.values() if _number(v) is not None), 1) if timings else None
    trial.device = (report.get("device") or {}).get("name")
    trial.frames = [f["image"] for f in (report.get("story") or {}).get("frames") or []
                    if isinstance(f, Mapping) and isinstance(f.get("image"), str)]  # fmt: skip
    if score:
        trial.objective = objective(weights, {"mean_aesthetic": trial.mean_aesthetic,
                                              "consistency": trial.consistency})  # fmt: skip
    state = status.get("state")
    if state == "succeeded" and store.exists(MARKER):
        if score.get("passed") is False:
            trial.state, trial.detail = "failed-gate", _gate_line(trial)
        else:
            trial.state = "succeeded"
    elif state == "failed" and (trial.exit_code == ExitCode.QUALITY_GATE or score.get("passed") is False):
        trial.state, trial.detail = "failed-gate", _gate_line(trial)
    elif state == "failed":
        trial.state, trial.detail = "failed", _error(status)
    elif state == "interrupted":
        trial.state, trial.detail = "interrupted", _error(status) or "exit 75: a rerun resumes"
    elif state == "running" or (not status and resolved):
        live, beat = _claim_live(store, now)
        where = f"stage {status.get('stage')}" if status.get("stage") else "starting"
        if live:
            trial.state, trial.detail = "running", where
        else:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(beat)) if beat else "never"
            trial.state, trial.detail = "crashed", f"{where}; no final status, last heartbeat {at}"
    return trial


def _gate_line(trial: Trial) -> str:
    mean = "n/a" if trial.mean_aesthetic is None else f"{trial.mean_aesthetic:.3f}"
    return f"quality gate: mean aesthetic {mean} under {trial.threshold}"


def _error(status: Mapping[str, Any]) -> str:
    err = status.get("error")
    code = status.get("exit_code")
    text = err.get("message", "") if isinstance(err, Mapping) else str(err or "")
    return f"exit {code}: {text}".strip(": ") if code is not None else text


def _manifest(store: Any) -> dict[str, Any] | None:
    try:
        doc = yaml.safe_load(store.read_bytes("manifest.resolved.yaml"))
    except StorageNotFoundError:
        return None
    except yaml.YAMLError:
        return None
    return doc if isinstance(doc, dict) else None


def trial_names(store: Any) -> list[str]:
    """The trial directories under the experiment prefix: every top-level directory with a job's files."""
    names: set[str] = set()
    for key in store.list(""):
        top, sep, rest = key.partition("/")
        if sep and not top.startswith(("_", ".")) and top != BEST and rest in (
            "status.json", "manifest.resolved.yaml", "report.json"):  # fmt: skip
            names.add(top)
    return sorted(names)


def rank(trials: list[Trial]) -> list[Trial]:
    """Succeeded by objective, then failed-gate by objective, then the rest by state; names break ties."""

    def key(t: Trial) -> tuple[int, float, str]:
        return STATE_ORDER.index(t.state), -(t.objective if t.objective is not None else -math.inf), t.name

    ordered = sorted(trials, key=key)
    for i, t in enumerate(ordered, 1):
        t.rank = i
    return ordered


def weights_from_trials(store: Any, names: list[str]) -> dict[str, float] | None:
    from kolors_job.sweep.metrics import parse_weights

    for name in names:
        doc = _manifest(store.child(name)) or {}
        text = ((doc.get("metadata") or {}).get("labels") or {}).get(OBJECTIVE_LABEL)
        if text:
            return parse_weights(text)
    return None


# ------------------------------------------------------------------------------------------ publishing


def _put_if_changed(store: Any, key: str, data: bytes) -> bool:
    try:
        if store.exists(key) and store.read_bytes(key) == data:
            return False
    except StorageNotFoundError:
        pass
    store.write_bytes(key, data)
    return True


def publish_best(root: Any, best: Trial, weights: Mapping[str, float], uri: str) -> list[str]:
    """Copy the winner's files into ``best/`` (marker removed first, written last); the keys written."""
    src, dst = root.child(best.name), root.child(BEST)
    keys = [k for k in src.list("") if k in BEST_FILES or k.startswith(BEST_DIRS)]
    with tempfile.TemporaryDirectory(prefix="kolors-sweep-") as tmp:
        digests: dict[str, str] = {}
        for key in keys:
            local = Path(tmp, *key.split("/"))
            src.download_file(key, local)
            digests[key] = hashlib.sha256(local.read_bytes()).hexdigest()
        pointer = {
            "trial": best.name,
            "source": redact_uri(f"{uri.rstrip('/')}/{best.name}/"),
            "objective": best.objective,
            "weights": dict(weights),
            "mean_aesthetic": best.mean_aesthetic,
            "consistency": best.consistency,
            "params": best.params,
            "files": digests,
        }
        blob = (json.dumps(pointer, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()
        if dst.exists(MARKER) and _json(dst, BEST_POINTER) == json.loads(blob):
            return []  # already published, byte for byte
        dst.delete(MARKER)
        written = []
        for key in keys:
            local = Path(tmp, *key.split("/"))
            if _put_if_changed(dst, key, local.read_bytes()):
                written.append(f"{BEST}/{key}")
        for stale in set(dst.list("")) - set(keys) - {BEST_POINTER, MARKER}:
            dst.delete(stale)  # a previous winner's file this one does not have
        dst.write_bytes(BEST_POINTER, blob)
        dst.write_bytes(MARKER, b"")
    return [*written, f"{BEST}/{BEST_POINTER}", f"{BEST}/{MARKER}"]


# ------------------------------------------------------------------------------------------ html


def _thumbs(store: Any, trial: Trial) -> list[str | None]:
    from PIL import Image

    uris: list[str | None] = []
    for rel in trial.frames:
        try:
            img = Image.open(io.BytesIO(store.child(trial.name).read_bytes(rel))).convert("RGB")
            img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            uris.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
        except Exception:  # a missing or broken frame must not cost the page
            uris.append(None)
    return uris


def _as_float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def param_plot(name: str, trials: list[Trial], width: int = 360, height: int = 220) -> dict[str, Any]:
    """One parameter against the objective: scored trials as points (numeric x, log when it spans 20×;
    categories in the order seen)."""
    scored = [t for t in trials if t.objective is not None and name in t.params]
    texts = [t.params[name] for t in scored]
    numbers = [_as_float(x) for x in texts]
    numeric = bool(scored) and all(v is not None for v in numbers)
    log = numeric and min(numbers) > 0 and max(numbers) / min(numbers) >= 20  # type: ignore[type-var,operator]
    cats = list(dict.fromkeys(texts))
    left, right, top, bottom = 56, 12, 12, 40
    pw, ph = width - left - right, height - top - bottom
    xs = [math.log10(v) if log else v for v in numbers] if numeric else [float(cats.index(x)) for x in texts]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    ys = [t.objective for t in scored]
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)  # type: ignore[type-var]
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5  # type: ignore[operator]
    pad, ypad = (x1 - x0) * 0.06, (y1 - y0) * 0.08  # type: ignore[operator]
    x0, x1, y0, y1 = x0 - pad, x1 + pad, y0 - ypad, y1 + ypad  # type: ignore[operator]
    points = [
        {"x": round(left + (x - x0) / (x1 - x0) * pw, 1), "y": round(top + (1 - (y - y0) / (y1 - y0)) * ph, 1),
         "ok": t.state == "succeeded", "label": f"{t.name}: {name}={t.params[name]}, objective {y:.4f}"}
        for t, x, y in zip(scored, xs, ys, strict=True)
    ]  # fmt: skip
    ticks = []
    if not numeric:
        ticks = [{"x": round(left + (i - x0) / (x1 - x0) * pw, 1), "text": c} for i, c in enumerate(cats)]
    low, high = (10**x0, 10**x1) if log else (x0, x1)
    return {
        "name": name, "width": width, "height": height, "left": left, "top": top,
        "right": left + pw, "bottom": top + ph, "points": points, "ticks": ticks, "log": log,
        "x_min": f"{low:.3g}" if numeric else "", "x_max": f"{high:.3g}" if numeric else "",
        "y_min": f"{y0:.4g}", "y_max": f"{y1:.4g}",
    }  # fmt: skip


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("kolors_job", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=lambda v: "—" if v is None else v,
)
_ENV.filters["num"] = lambda v, d=4: "—" if not isinstance(v, (int, float)) else f"{v:.{d}f}"


def render_html(name: str, uri: str, trials: list[Trial], best: Trial | None, weights: Mapping[str, float],
                top: list[tuple[Trial, list[str | None]]]) -> str:  # fmt: skip
    params = list(dict.fromkeys(p for t in trials for p in t.params))
    gpu_seconds = sum(t.seconds or 0 for t in trials)
    return _ENV.get_template("sweep.html.j2").render(
        name=name, uri=redact_uri(uri), trials=trials, best=best, params=params,
        objective=" + ".join(f"{w:g}×{m}" for m, w in weights.items()),
        plots=[param_plot(p, trials) for p in params], top=top,
        counts={s: sum(t.state == s for t in trials) for s in STATE_ORDER if any(t.state == s for t in trials)},
        job_hours=gpu_seconds / 3600,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ command


def sweep_report(uri: str, *, weights: Mapping[str, float] | None = None, publish: bool = True,
                 say: Callable[[str], None] = lambda s: None, settings: Any = None) -> SweepResult:  # fmt: skip
    """Read every trial under ``uri``, rank them, write sweep.json + sweep.html, publish the best one."""
    from kolors_job.storage import open_store

    root = open_store(uri, settings) if settings is not None else open_store(uri)
    names = trial_names(root)
    weights = dict(weights or weights_from_trials(root, names) or DEFAULT_WEIGHTS)
    now = time.time()
    trials = rank([read_trial(root.child(n), n, weights, now) for n in names])
    best = next((t for t in trials if t.state == "succeeded" and t.objective is not None), None)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    written: list[str] = []
    if publish and best is not None:
        written += publish_best(root, best, weights, uri)
    summary = {
        "experiment": name,
        "prefix": redact_uri(uri),
        "objective": {"weights": weights},
        "best": None if best is None else {
            "trial": best.name, "objective": best.objective, "params": best.params, "uri": f"{BEST}/",
        },
        "counts": {s: sum(t.state == s for t in trials) for s in STATE_ORDER},
        "trials": [t.row() for t in trials],
    }
    blob = (json.dumps(summary, ensure_ascii=False, indent=2) + "\n").encode()
    if _put_if_changed(root, "sweep.json", blob):
        written.append("sweep.json")
    top = [(t, _thumbs(root, t)) for t in trials if t.state in ("succeeded", "failed-gate")][:3]
    html = render_html(name, uri, trials, best, weights, top).encode()
    if _put_if_changed(root, "sweep.html", html):
        written.append("sweep.html")
    for t in trials:
        score = "n/a" if t.objective is None else f"{t.objective:.4f}"
        params = " ".join(f"{k}={v}" for k, v in t.params.items())
        say(f"{t.rank:>3}. {t.name}  {t.state:<11} objective {score}  {params}  {t.detail}".rstrip())
    where = f"{redact_uri(uri.rstrip('/'))}/{BEST}/"
    say(f"best: {best.name} → {where}" if best else "best: none (no trial passed the gate)")
    return SweepResult(uri, trials, best, weights, written)


def followed_outcome(uri: str, followed: str | None, *, weights: Mapping[str, float],
                     say: Callable[[str], None]) -> int:  # fmt: skip
    """``submit katib|pai-automl``'s last step, once following the sweep ended (``followed``: the platform's
    final state, None at the timeout): report what the trials left, exit with :func:`outcome_code` — or 75 when
    the wait timed out before any trial won."""
    result = sweep_report(uri, weights=weights, say=say)
    if followed is None and result.best is None:
        return int(ExitCode.TEMPORARY)
    return outcome_code(result)


def outcome_code(result: SweepResult) -> int:
    """The sweep's exit code: 0 with a winner; 75 while trials still run; 3 when every finished trial fell
    under the gate; else the first failure's code (1 if it has none)."""
    if result.best is not None:
        return int(ExitCode.OK)
    states = {t.state for t in result.trials}
    if "running" in states:
        return int(ExitCode.TEMPORARY)
    if "failed-gate" in states:
        return int(ExitCode.QUALITY_GATE)
    for t in result.trials:
        if t.exit_code:
            return t.exit_code
    return int(ExitCode.INTERNAL)


def cmd_report(args: Any) -> int:
    from kolors_job.sweep.metrics import parse_weights
    from kolors_job.sweep.spec import load_sweep

    weights = None
    if args.sweep:
        weights = load_sweep(args.sweep).body.objective.weights
    elif args.objective:
        weights = parse_weights(args.objective)
    result = sweep_report(args.prefix, weights=weights, publish=not args.no_publish, say=_stderr)
    return outcome_code(result)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["SET_LABEL", "SweepResult", "Trial", "outcome_code", "publish_best", "rank", "sweep_report"]
