"""The pure detection engine (no Faust, Kafka, HTTP or I/O): shared by the live worker and the offline commands.

See docs/detection.md for the method. The contract other modules code against is re-exported here.
"""

from importlib.machinery import EXTENSION_SUFFIXES

from streams.detection import core as _core
from streams.detection.context import DetectionContext, Window
from streams.detection.core import (
    Engine,
    StepResult,
    apply_changes,
    event_state_key,
    is_simulated,
    run_offline,
    series_state_key,
)
from streams.detection.stats import cusum_up, wilson

# built by mypyc (CENSORWATCH_COMPILE=1, setup.py): the same source, faster; said at start and in the bench
COMPILED = (_core.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))

__all__ = [
    "COMPILED",
    "DetectionContext",
    "Engine",
    "StepResult",
    "Window",
    "apply_changes",
    "cusum_up",
    "event_state_key",
    "is_simulated",
    "run_offline",
    "series_state_key",
    "wilson",
]
