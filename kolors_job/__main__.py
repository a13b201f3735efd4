import sys

from kolors_job.cli import main

sys.exit(main())
