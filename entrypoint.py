"""Container entry point: everything lives in the CLI (``kolors-job --help``)."""

import sys

from kolors_job.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
