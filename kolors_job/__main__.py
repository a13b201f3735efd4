import sys

from kolors_job.cli import entry

sys.exit(entry())
