import sys

from notelake.jobs.linking.cli import main

sys.exit(main())
