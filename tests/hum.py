from musicgen_lite.hum import synth_hum  # noqa: F401  (re-exported: the tests import their hums from here)
