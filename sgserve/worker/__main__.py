import sys

from sgserve.worker.serve import main

sys.exit(main())
