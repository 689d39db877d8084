"""Generate music from text: python generate.py --text "mozart sonata allegro" [--melody hum.wav]."""

import sys

from musicgen_lite.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
