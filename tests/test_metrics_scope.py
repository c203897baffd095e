"""Each process exports its own service's metrics only (plus the shared ones in ``censorwatch.metrics_common``).

Every ``censorwatch`` process builds the whole command line, so a module that one subcommand imports lands in all
of them; a poller metric registered in the worker or the dispatcher shows up on their ``/metrics`` (the API quota
gauge, NaN there, became one more line on the quota panel per process).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

EXPORTED = """
import sys
from prometheus_client import generate_latest
from censorwatch.cli import build_parser
build_parser()
for module in sys.argv[1:]:
    __import__(module)
names = {line.split("{")[0].split(" ")[0] for line in generate_latest().decode().splitlines() if line[:1] != "#"}
print(" ".join(sorted({name.split("_")[1] for name in names if name.startswith("censorwatch_")})))
"""


def exported_families(*modules: str) -> set[str]:
    """The second word of every ``censorwatch_`` metric a fresh process exports after importing ``modules``."""
    run = subprocess.run(
        [sys.executable, "-c", EXPORTED, *modules], capture_output=True, text=True, timeout=120, check=True
    )
    return set(run.stdout.split())


SHARED = {"deadletter", "consumer"}  # censorwatch.metrics_common


@pytest.mark.parametrize(
    ("modules", "own"),
    [
        (["services.poller"], {"poller"}),
        (["streams.app", "streams.worker"], {"worker", "series"}),
        (["alerts.dispatcher"], {"dispatcher", "notification", "notifications"}),
    ],
)
def test_each_process_exports_its_own_metrics_only(modules: list[str], own: set[str]) -> None:
    families = exported_families(*modules)
    assert families & own, f"{modules}: none of its own metrics seen, so the check below proves nothing"
    assert families <= own | SHARED, f"{modules} also exports {sorted(families - own - SHARED)}"
