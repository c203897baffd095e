"""The pure detection engine (no Faust, Kafka or HTTP): shared by the live worker and offline commands."""

from streams.detection.core import DetectionContext, Engine, StepResult, run_offline, wilson

__all__ = ["DetectionContext", "Engine", "StepResult", "run_offline", "wilson"]
