"""The optional compiled engine (``CENSORWATCH_COMPILE=1``, mypyc; see ``setup.py``) is the same engine.

A build of the project with it compiled must load the compiled modules, pass the engine's and the worker's tests,
and give the pure engine's notices, byte for byte, on a slice of the benchmark's simulated year.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "setup.py", "README.md", "censorwatch", "services", "streams", "alerts", "reports"]

HASH_SLICE = """
import hashlib, sys
sys.path.append(sys.argv[1])  # bench/, after the build under test
from run import simulated_year
from censorwatch.config import load_settings
from streams.detection import DetectionContext, Engine, apply_changes
import streams.detection.core as core
settings = load_settings(countries=["KH"])
engine = Engine(settings.detection, DetectionContext.from_settings(settings))
state, h, n = {}, hashlib.sha256(), 0
for m in simulated_year(0.01):
    r = engine.step(state, m)
    apply_changes(state, r.changes)
    for e in r.events:
        n += 1
        h.update(e.to_bytes())
print(core.__file__.endswith(".so"), n, h.hexdigest())
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The project built with ``CENSORWATCH_COMPILE=1`` into a folder of its own (from a copy of the sources:
    a build writes into its source tree)."""
    if (
        not (shutil.which("cc") or shutil.which("gcc"))
        or not Path(sysconfig.get_paths()["include"], "Python.h").exists()
    ):
        pytest.skip("building the compiled engine needs a C compiler and the Python headers")  # it is optional
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("compiled")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(target), str(src)],
        env={**os.environ, "CENSORWATCH_COMPILE": "1"},
        check=True,
        timeout=600,
    )
    yield target


EXPECT_COMPILED = """
import streams.detection, streams.detection.core, streams.detection.stats

def pytest_configure(config):
    for module in (streams.detection.core, streams.detection.stats):
        assert module.__file__.endswith(".so"), f"testing the pure {module.__name__}, not the compiled one"
    assert streams.detection.COMPILED
"""


def _run(args: list[str], pythonpath: Path | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run Python in ``cwd``, outside the source tree, so that ``pythonpath`` (the build) comes before the
    sources (which the editable install puts last)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{cwd}"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_compiled_build_passes_the_engine_tests(compiled: Path, tmp_path: Path) -> None:
    probe = _run(
        ["-c", "import streams.detection.core as c, streams.detection.stats as s; print(c, s)"], compiled, tmp_path
    )
    assert probe.returncode == 0 and probe.stdout.count(".so") == 2, probe.stdout + probe.stderr
    # --import-mode=append: pytest adds the source tree after the build under test, not before it; the plugin
    # checks that the engine the tests import is the compiled one
    (tmp_path / "expect_compiled.py").write_text(EXPECT_COMPILED)
    # the engine's own tests, and the worker's: the service image runs the compiled engine in the worker, where
    # mypyc's run-time type checks meet state read back from the changelog (the worker processes inherit the path)
    names = ("detection", "replay", "backtest", "simulate", "worker", "faults_worker")
    tests = [str(ROOT / "tests" / f"test_{name}.py") for name in names]
    pytest = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "expect_compiled", "--import-mode=append"]
    inner = tmp_path / "inner"
    run = _run([*pytest, "--rootdir", str(ROOT), "--basetemp", str(inner), *tests], compiled, tmp_path)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    starts = [log.read_text() for log in inner.rglob("worker*.log")]
    assert starts and all("detection engine: compiled (mypyc)" in text for text in starts)  # its worker processes


def test_compiled_engine_gives_the_same_notices(compiled: Path, tmp_path: Path) -> None:
    pure = _run(["-c", HASH_SLICE, str(ROOT / "bench")], None, tmp_path)
    built = _run(["-c", HASH_SLICE, str(ROOT / "bench")], compiled, tmp_path)
    assert pure.returncode == 0 and built.returncode == 0, pure.stderr[-3000:] + built.stderr[-3000:]
    is_so, n, digest = built.stdout.split()
    assert is_so == "True" and pure.stdout.split()[0] == "False"
    assert int(n) > 0 and pure.stdout.split()[1:] == [n, digest]
