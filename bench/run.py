"""censorwatch benchmarks: prints figures (not a test). ``make bench`` runs all parts; see BENCHMARKS.md.

Parts (``--only`` picks some):

* ``throughput``: raw kafka-python consume rate on an embedded Tansu broker vs the Faust worker's end-to-end rate
  (measurement topic -> detection -> events) on the same broker and input, printed as a ratio; with what bounds
  it on the same records: aiokafka consuming a batch at a time, a Faust agent that does nothing
  (``bench/faust_floor.py``), decoding, the engine alone.
* ``offline``: one year of Cambodian-scale traffic (2.44 M measurements, ~1,900 targets, 31 ASNs; SIMULATED by a
  seeded generator) through the pure engine in-process: time and peak memory.
* ``latency``: p50/p99 from a measurement produced to the Slack call it causes (worker + dispatcher subprocesses,
  a loopback Slack Web API fake).

All traffic is loopback; every input here is simulated and labelled so.

    python bench/run.py                      # everything, full scale
    python bench/run.py --only offline --scale 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: `make bench` puts the compiled build (`make compiled`) there

from censorwatch import bus  # noqa: E402
from censorwatch.broker import EmbeddedBroker  # noqa: E402
from censorwatch.config import Settings, load_settings  # noqa: E402
from censorwatch.models import Measurement  # noqa: E402
from tests.conftest import free_port  # noqa: E402 - the suite's helpers: the bench runs the same services
from tests.services import Service  # noqa: E402
from tests.services import wait_until as wait  # noqa: E402

YEAR_MEASUREMENTS = 2_440_000
TARGETS = 1_900
ASNS = 31
T0 = datetime(2023, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------------------------
# simulated traffic


def sim_measurement(
    cc: str,
    asn: int,
    target: str,
    run_start: datetime,
    run: str,
    k: int,
    *,
    anomaly: bool = False,
    confirmed: bool = False,
    failure: bool = False,
    blocking_type: str | None = None,
    fetched_at: datetime | None = None,
) -> Measurement:
    """The ``k``-th SIMULATED measurement of probe run ``run`` (hex), started ``k`` seconds into the run: its uid
    and report id end in ``_sim<hex>``, so whatever is built on it says "simulated". Built without validation (the
    year is 2.44 M of them); fetched five minutes after it started unless ``fetched_at`` says otherwise."""
    start = run_start + timedelta(seconds=k)
    return Measurement.model_construct(
        uid=f"{start:%Y%m%d%H%M%S}.000000_{cc}_webconnectivity_sim{run}{k:03x}",
        report_id=f"{run_start:%Y%m%dT%H%M%SZ}_webconnectivity_{cc}_{asn}_n1_sim{run}",
        cc=cc,
        asn=asn,
        test_name="web_connectivity",
        start_time=start,
        input=f"https://{target}/",
        target=target,
        anomaly=anomaly,
        confirmed=confirmed,
        failure=failure,
        blocking_type=blocking_type,
        confirmed_by=None,
        fetched_at=fetched_at or start + timedelta(minutes=5),
    )


def simulated_year(scale: float = 1.0, seed: int = 2023, cc: str = "KH") -> Iterator[Measurement]:
    """SIMULATED Cambodian-scale year: probe runs on 31 ASNs, each testing a slice of ~1,900 targets, in time order.

    About 3 % of targets are blocked (DNS) on a third of the ASNs from some day on, 2 % background anomalies,
    1 % failures, a few confirmed. uids end in ``_sim<hex>`` so every event built on them says "simulated".
    """
    rng = random.Random(seed)
    total = int(YEAR_MEASUREMENTS * scale)
    asns = [17976, 24416, 38901, 131178, 38623, *range(64500, 64500 + ASNS - 5)]
    targets = [f"site{i:04d}.example.kh" for i in range(TARGETS)]
    blocked = {
        (t, a): rng.uniform(0, 330)
        for t in rng.sample(targets, TARGETS * 3 // 100)
        for a in rng.sample(asns, ASNS // 3)
    }
    per_run = 120
    runs = max(1, total // per_run)
    span = 365 * 86400.0
    produced = 0
    for r in range(runs):
        t = T0 + timedelta(seconds=span * r / runs)
        day = (t - T0).total_seconds() / 86400
        asn = asns[int(rng.paretovariate(1.2)) % ASNS]  # a few big ISPs carry most runs
        n = per_run if r < runs - 1 else total - produced
        for k, target in enumerate(rng.sample(targets, min(n, TARGETS))):
            since = blocked.get((target, asn))
            is_blocked = since is not None and day >= since and rng.random() < 0.85
            failure = rng.random() < 0.01
            anomaly = is_blocked or rng.random() < 0.02
            yield sim_measurement(
                cc,
                asn,
                target,
                t,
                f"{r:08x}",
                k,
                anomaly=anomaly and not failure,
                confirmed=is_blocked and rng.random() < 0.05,
                failure=failure,
                blocking_type="dns" if is_blocked else None,
            )
        produced += n


# ---------------------------------------------------------------------------------------------------------------
# helpers


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    from streams.detection import COMPILED

    return {
        "detection engine": "compiled (mypyc)" if COMPILED else "pure Python",
        "cpus (os.cpu_count)": str(os.cpu_count()),
        "usable cpus (affinity)": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "?",
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def scrape_sum(port: int, prefix: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return -1.0
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def start_service(command: str, settings: Settings, workdir: Path) -> Service:
    return Service([command], settings, workdir, name=command).start()


def bench_settings(bootstrap: str, workdir: Path, **kw: Any) -> Settings:
    kw.setdefault("broker_kind", "tansu")
    s = load_settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=f"bench{uuid.uuid4().hex[:8]}",
        topic_partitions=1,
        kafka_session_timeout_seconds=6.0,
        countries=["KH"],
        state_dir=workdir / "state",
        console=False,
        **kw,
    )
    s.state_dir.mkdir(parents=True, exist_ok=True)
    bus.ensure_topics(s)
    return s


# ---------------------------------------------------------------------------------------------------------------
# (a) throughput


def bench_throughput(bootstrap: str, workdir: Path, n: int) -> dict[str, float]:
    """Raw kafka-python consume rate, then the worker over the same records twice: as the embedded default runs
    it (``broker_kind=tansu``: notices, dead letters and each batch's marker flushed alone, which Tansu's
    watermarks need) and as it runs on Kafka (``broker_kind=kafka``: no such flushes). Each run has its own
    topics, group and state."""
    records = [(m.cc.encode(), m.to_bytes()) for m in _take(simulated_year((n + 1) / YEAR_MEASUREMENTS, seed=7), n + 1)]
    runs = {
        kind: bench_settings(
            bootstrap,
            workdir / kind,
            broker_kind=kind,
            metrics={"worker_port": free_port(), "poller_port": 0, "dispatcher_port": 0},
        )
        for kind in ("tansu", "kafka")
    }
    out: dict[str, float] = {"measurements": float(n)}
    for settings in runs.values():
        producer = bus.producer(settings, linger_ms=50, batch_size=256 * 1024)
        t = time.perf_counter()
        bus.send_all(producer, settings.topics.measurements, records[:n], 300)
        out.setdefault("produce_rate", n / (time.perf_counter() - t))
        # Tansu's high watermark stops at the last batch's first record, and readers stop there: one more
        # record in a batch of its own puts all n below it.
        bus.send_all(producer, settings.topics.measurements, records[n:], 30)
        producer.close()

    from kafka import TopicPartition

    settings = runs["tansu"]
    consumer = bus.consumer(settings, group_id=None, fetch_max_bytes=50 * 1024 * 1024)
    tp = TopicPartition(settings.topics.measurements, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got = 0
    t = time.perf_counter()
    while got < n:
        for batch in consumer.poll(timeout_ms=500, max_records=10000).values():
            got += len(batch)
        if time.perf_counter() - t > 120:
            raise TimeoutError(f"raw consume stopped at {got} of {n}")
    out["raw_consume_rate"] = n / (time.perf_counter() - t)
    consumer.close()
    out.update(_floors(settings, [raw for _, raw in records[:n]]))

    for kind, settings in runs.items():
        rate = _worker_rate(settings, workdir / kind, n)
        out[f"end_to_end_rate_{kind}"] = rate
        out[f"ratio_{kind}"] = rate / out["raw_consume_rate"]
    return out


def _floors(settings: Settings, raws: list[bytes]) -> dict[str, float]:
    """What bounds the worker, on the same records: a Faust agent that does nothing (subprocess, same broker and
    topic), aiokafka consuming a batch at a time, and in-process the decoding (JSON + the pydantic model) and the
    engine (step + apply, fresh state)."""
    from streams.detection import DetectionContext, Engine, apply_changes

    result = Path(tempfile.mkdtemp(prefix="censorwatch-floor-")) / "floor.json"
    floor = [settings.bootstrap(), settings.topics.measurements, str(len(raws)), str(result)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "faust_floor.py"), *floor], capture_output=True, timeout=600
    )
    if not result.exists():
        raise RuntimeError(f"the Faust floor run failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    out = {"faust_floor_rate": float(orjson.loads(result.read_bytes())["rate"])}
    out["aiokafka_batch_rate"] = asyncio.run(_aiokafka_batch_rate(settings, len(raws)))
    t = time.perf_counter()
    decoded = [Measurement.model_validate(orjson.loads(raw)) for raw in raws]
    out["decode_rate"] = len(raws) / (time.perf_counter() - t)
    engine = Engine(settings.detection, DetectionContext.from_settings(settings))
    state: dict[str, Any] = {}
    t = time.perf_counter()
    for m in decoded:
        apply_changes(state, engine.step(state, m).changes)
    out["engine_rate"] = len(raws) / (time.perf_counter() - t)
    # No Faust at all: aiokafka batches, decoded and stepped as they come (no state store, no notices sent), the
    # most any worker around this engine could do here.
    engine, state = Engine(settings.detection, DetectionContext.from_settings(settings)), {}

    def detect(records: list[Any]) -> None:
        for record in records:
            apply_changes(state, engine.step(state, Measurement.model_validate(orjson.loads(record.value))).changes)

    out["batch_pipeline_rate"] = asyncio.run(_aiokafka_batch_rate(settings, len(raws), detect))
    return out


async def _aiokafka_batch_rate(settings: Settings, n: int, handle: Callable[[list[Any]], None] | None = None) -> float:
    """aiokafka (the client under Faust) taking records a batch at a time (``getmany``), each batch passed to
    ``handle``: what consumption costs without Faust's per-record path (one event, channel hop and
    acknowledgement each)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap(),
        enable_auto_commit=False,
        fetch_max_bytes=50 * 1024 * 1024,
        max_partition_fetch_bytes=10 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tp = TopicPartition(settings.topics.measurements, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got, t0 = 0, time.perf_counter()
        while got < n:
            for records in (await consumer.getmany(timeout_ms=500, max_records=10000)).values():
                got += len(records)
                if handle is not None:
                    handle(records)
            if time.perf_counter() - t0 > 120:
                raise TimeoutError(f"aiokafka consume stopped at {got} of {n}")
        return n / (time.perf_counter() - t0)
    finally:
        await consumer.stop()


def _worker_rate(settings: Settings, workdir: Path, n: int) -> float:
    """Measurements per second from the worker's first processed record to the last count read below n.

    Each scrape takes the worker's single core for a moment (a 0.25 s poll cost it about 7 %), so the count is read
    once a second, and the rate is taken up to the last reading that was still below n: the moment the n-th record
    was processed lies somewhere in the last second and would blur the figure by up to that second.
    """
    port = settings.metrics.worker_port
    worker = start_service("worker", settings, workdir)
    try:
        prefix = "censorwatch_worker_measurements_processed_total"
        wait(lambda: worker.check() and scrape_sum(port, prefix) > 0, 120, "the worker's first measurement", 0.01)
        t_first = time.perf_counter()
        first = last = scrape_sum(port, prefix)
        t_last = t_first
        deadline = t_first + 1800
        while True:
            time.sleep(1.0)
            worker.check()
            count, now = scrape_sum(port, prefix), time.perf_counter()
            if count >= n:
                break
            if now > deadline:
                raise TimeoutError(f"the worker processed {count:.0f} of {n} in 1800 s")
            if count >= 0:  # -1: the scrape failed this time
                last, t_last = count, now
        if last > first:
            return (last - first) / (t_last - t_first)
        return (n - first) / (now - t_first)  # done within the first second: an upper bound on the time
    finally:
        worker.stop()


def _take(it: Iterator[Measurement], n: int) -> list[Measurement]:
    out = []
    for m in it:
        out.append(m)
        if len(out) >= n:
            break
    return out


# ---------------------------------------------------------------------------------------------------------------
# (b) offline


def bench_offline(scale: float) -> dict[str, float]:
    from streams.detection import DetectionContext, Engine, apply_changes

    settings = load_settings(countries=["KH"])
    engine = Engine(settings.detection, DetectionContext.from_settings(settings))
    state: dict[str, Any] = {}
    events = 0
    n = 0
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine_s = 0.0
    t_all = time.perf_counter()
    for m in simulated_year(scale):
        t = time.perf_counter()
        result = engine.step(state, m)
        apply_changes(state, result.changes)
        engine_s += time.perf_counter() - t
        events += len(result.events)
        n += 1
    wall_s = time.perf_counter() - t_all
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "measurements": n,
        "events": events,
        "state_keys": len(state),
        "state_json_mib": sum(len(k) + len(orjson.dumps(v)) for k, v in state.items()) / 2**20,
        "engine_seconds": engine_s,
        "wall_seconds_with_generation": wall_s,
        "rate": n / engine_s,
        "peak_rss_mib": rss_after / 1024,
        "rss_growth_mib": (rss_after - rss_before) / 1024,
    }


# ---------------------------------------------------------------------------------------------------------------
# (c) latency


def bench_latency(bootstrap: str, workdir: Path, n: int) -> dict[str, float]:
    from tests.fakes.slack_api import FakeSlackApi

    with FakeSlackApi(token="xoxb-bench") as slack:  # noqa: S106 - a loopback fake's token
        worker_port, dispatcher_port = free_port(), free_port()
        settings = bench_settings(
            bootstrap,
            workdir,
            metrics={"worker_port": worker_port, "dispatcher_port": dispatcher_port, "poller_port": 0},
            slack={
                "enabled": True,
                "token": "xoxb-bench",
                "base_url": slack.base_url,
                "channel": "#bench",
                "min_interval_seconds": 0.0,
                "timeout_seconds": 5,
            },
        )
        with ExitStack() as stack:
            worker = start_service("worker", settings, workdir / "lat-worker")
            stack.callback(worker.stop)
            dispatcher = start_service("dispatch", settings, workdir / "lat-dispatcher")
            stack.callback(dispatcher.stop)
            wait(
                lambda: worker.check() and scrape_sum(worker_port, "censorwatch_deadletter_total") >= 0,
                60,
                "the worker",
            )
            wait(
                lambda: dispatcher.check() and scrape_sum(dispatcher_port, "censorwatch_notifications_total") >= 0,
                60,
                "the dispatcher",
            )
            producer = bus.producer(settings, linger_ms=0)
            # Warm-up: the worker's group join and the dispatcher's first poll are start-up, not latency.
            sent: dict[str, float] = {}
            for i in range(n + 3):
                target = f"lat{i:04d}.example.kh"
                m = sim_measurement(
                    "KH",
                    38623,
                    target,
                    datetime.now(UTC),
                    f"{i:06x}",
                    0,
                    anomaly=True,
                    confirmed=True,
                    blocking_type="dns",
                )
                sent[target] = time.monotonic()
                bus.send_all(producer, settings.topics.measurements, [(b"KH", m.to_bytes())], 30)
                if i < 3:  # warm-up, wait for each to arrive
                    wait(lambda t=target: _slack_at(slack, t) is not None, 120, "the warm-up notice")  # type: ignore[misc]
                else:
                    time.sleep(0.25)  # spaced: one notice at a time, latency rather than queueing
            producer.close()
            targets = list(sent)[3:]
            wait(lambda: all(_slack_at(slack, t) is not None for t in targets), 120, "every Slack call")
            lat = sorted(_slack_at(slack, t) - sent[t] for t in targets)  # type: ignore[operator]
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"notices": len(lat), "p50_s": q[49], "p99_s": q[98], "max_s": lat[-1]}


def _slack_at(slack: Any, target: str) -> float | None:
    for call in slack.calls_of("chat.postMessage"):
        if target in call.text:
            return float(call.at)
    return None


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        action="append",
        choices=["throughput", "offline", "latency"],
        help="run only these parts (repeatable); default all",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full sizes (0.1 = a quick run)")
    args = parser.parse_args(argv)
    parts = args.only or ["throughput", "offline", "latency"]
    print("machine:")
    for k, v in machine().items():
        print(f"  {k}: {v}")
    print(f"scale: {args.scale:g}  (all data SIMULATED, seeded)")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="censorwatch-bench-")))
        if "offline" in parts:
            r = bench_offline(args.scale)
            print(
                f"\n(1) offline engine, SIMULATED year: {r['measurements']:.0f} measurements, {TARGETS} targets, "
                f"{ASNS} ASNs (single thread)"
            )
            print(
                f"  engine time:        {r['engine_seconds']:8.1f} s   ({r['rate']:.0f} msg/s; target < 120 s "
                "at full scale)"
            )
            print(f"  with generation:    {r['wall_seconds_with_generation']:8.1f} s")
            print(f"  events emitted:     {r['events']:8.0f}   state keys: {r['state_keys']:.0f}")
            print(
                f"  peak RSS:           {r['peak_rss_mib']:8.0f} MiB (process; grew "
                f"{r['rss_growth_mib']:.0f} MiB during the run)"
            )
            print(f"  state as JSON:      {r['state_json_mib']:8.0f} MiB (the changelog's live size)")
        broker: EmbeddedBroker | None = None
        if {"throughput", "latency"} & set(parts):
            broker = EmbeddedBroker(free_port(), workdir / "broker.log").start()
            stack.callback(broker.stop)
        if "throughput" in parts:
            assert broker is not None
            n = max(1000, int(50_000 * args.scale))
            r = bench_throughput(broker.bootstrap, workdir / "tp", n)
            print(f"\n(2) throughput, {r['measurements']:.0f} simulated measurements, 1 partition, embedded Tansu")
            print(f"  produce (kafka-python, batched):  {r['produce_rate']:10.0f} msg/s")
            print(f"  raw consume (kafka-python):       {r['raw_consume_rate']:10.0f} msg/s")
            print("  what bounds the worker, on the same records:")
            for key, what in (
                ("aiokafka_batch_rate", "aiokafka, a batch at a time"),
                ("faust_floor_rate", "a Faust agent doing nothing"),
                ("decode_rate", "decode (JSON + model) alone"),
                ("engine_rate", "detection engine alone"),
                ("batch_pipeline_rate", "aiokafka batches + decode + engine"),
            ):
                print(f"    {what:35s} {r[key]:10.0f} msg/s   = {r[key] / r['raw_consume_rate']:.1%} of raw")
            for kind, how in (("tansu", "as embedded (exact watermarks)"), ("kafka", "as on Kafka")):
                print(
                    f"  end-to-end, {how:28s} {r[f'end_to_end_rate_{kind}']:8.0f} msg/s   "
                    f"= {r[f'ratio_{kind}']:.1%} of raw (target >= 50 %)"
                )
        if "latency" in parts:
            assert broker is not None
            n = max(20, int(200 * args.scale))
            r = bench_latency(broker.bootstrap, workdir / "lat", n)
            print(f"\n(3) latency, measurement produced -> Slack chat.postMessage, {r['notices']:.0f} notices")
            print(f"  p50 {r['p50_s']:.3f} s   p99 {r['p99_s']:.3f} s   max {r['max_s']:.3f} s   (target p99 < 2 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
