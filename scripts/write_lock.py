"""Turn a ``pip install --dry-run --report`` JSON into requirements.lock (exact pins, sorted)."""

import json
import sys
from pathlib import Path

HEADER = """# The one pinned dependency set: `make test`, CI and the Docker image all install exactly this file
# (then `pip install --no-deps .`). Regenerate with `make lock` after changing pyproject.toml.
# Pins chosen for compatibility (docs/design.md §1): transformers 4.57.6 + huggingface_hub 0.36.2 +
# diffusers 0.39.0 + diffsynth 1.1.9 + simple-aesthetics-predictor 0.1.2 on torch 2.14.1.
"""


def main(report: str, out: str) -> None:
    data = json.loads(Path(report).read_text())
    pins = sorted(
        (i["metadata"]["name"].lower(), i["metadata"]["version"])
        for i in data["install"]
        if i["metadata"]["name"] != "kolors-job"
    )
    Path(out).write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in pins))


if __name__ == "__main__":
    main(*sys.argv[1:3])
