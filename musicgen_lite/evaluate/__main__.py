"""`python -m musicgen_lite.evaluate SECTION --model DIR [--data DIR]`: see musicgen_lite.evaluate."""

import sys

from .cli import main

sys.exit(main())
