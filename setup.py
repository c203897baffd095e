"""Optional compiled detection engine.

``CENSORWATCH_COMPILE=1 pip install --no-build-isolation .`` (in an environment with the dev extras, which bring
mypy and its mypyc compiler) builds the pure engine, ``streams/detection/core.py`` and ``stats.py``, into C
extensions: the same code, type-checked and run about 1.5x faster. Without the variable the install is pure Python,
as everything else. ``make compiled`` builds such a copy beside the sources; ``make bench`` runs on it.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

COMPILED = ["streams/detection/core.py", "streams/detection/stats.py"]

ext_modules = []
if os.environ.get("CENSORWATCH_COMPILE") == "1":
    if "editable_wheel" in sys.argv:
        # the extension would land beside its source and shadow every later edit of the .py
        raise SystemExit("CENSORWATCH_COMPILE=1 builds a regular install, not an editable one (see make compiled)")
    try:
        from mypyc.build import mypycify
    except ImportError as e:  # an isolated build environment has no mypy
        raise SystemExit(
            "CENSORWATCH_COMPILE=1 needs mypy (the dev extras) in the installing environment: "
            "pip install --no-build-isolation ."
        ) from e
    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
