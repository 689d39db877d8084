"""``python -m musicgen_lite.data.scores``: render captioned piano audio."""

import sys

from .build import main

sys.exit(main())
