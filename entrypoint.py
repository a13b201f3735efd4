"""Container entry point: everything lives in the CLI (``kolors-job --help``)."""

import sys

from kolors_job.cli import main

if __name__ == "__main__":
    sys.exit(main())
