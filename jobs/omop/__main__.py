import sys

from notelake.jobs.omop.cli import main

sys.exit(main())
