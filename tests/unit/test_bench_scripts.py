"""The benchmark scripts stay runnable: the plan, the ratios, and the in-process micro bench.

They are not part of the product, but a benchmark that silently breaks (a
constructor changes, a variant loses its floor) measures nothing; these are the
cheap checks. The benchmarks themselves are run by hand (`make bench`).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from benchkit import config, plan, soak_outcome, soak_runs, summary, tokens  # noqa: E402


def row(variant: str, case: str, rps: float, cpu: float, paced_p99: float) -> summary.Row:
    return summary.Row(
        variant=variant, case=case, rps=rps, p50_ms=1.0, p99_ms=2.0, paced_rps=1000.0,
        paced_p99_ms=paced_p99, server_cpu_s_per_1k=cpu, envoy_cpu_s_per_1k=0.1,
        paced_server_cpu_s_per_1k=cpu, cache_hit_share=1.0, runs=3, left_out=0, problems=[],
    )  # fmt: skip


def test_the_plan_covers_every_variant_and_case_once_per_round_and_mode() -> None:
    runs, needed = plan.plan(config.Settings(rounds=2))
    pairs = {(v, c) for v, cases in plan.VARIANT_CASES.items() for c in cases}
    assert len(runs) == 2 * len(plan.MODES) * len(pairs)
    assert {(r.variant, r.case) for r in runs} == pairs
    assert set(needed) == set(tokens.ALGORITHMS)
    assert set(plan.SERVER_OF) == set(plan.PROTOCOL_OF)
    assert set(plan.FLOOR_OF.values()) <= set(plan.VARIANT_CASES)


def test_fresh_token_slices_cover_each_runs_highest_rate() -> None:
    """A mix run in HTTP mode (90% hits) reached 13k requests/s: its slice must cover its
    fresh share of the hit ceiling, not of the miss ceiling (it once ran out)."""
    settings = config.Settings(rounds=1, duration=10)
    runs, _ = plan.plan(settings)
    slices = {(r.variant, r.case, r.mode): r.slice_count for r in runs if r.slice_count}
    mix = slices[("lastguard_http", "mix-rs256", "saturate")]
    assert mix >= 10 * 13_000 * plan.CASES["mix-rs256"].fresh_share
    miss = slices[("lastguard_http", "miss-rs256", "saturate")]
    assert miss >= 10 * settings.miss_rate_ceiling
    for alg in tokens.ALGORITHMS:  # no two runs share a token
        taken = sorted(
            (r.slice_start, r.slice_count)
            for r in runs
            if r.slice_count and plan.CASES[r.case].alg == alg
        )
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(taken))


def test_each_lastguard_variant_is_held_to_its_own_protocols_floor() -> None:
    rows = [
        row("noop", "hit-rs256", 4000, 0.30, 3.0),
        row("noop_http", "hit-rs256", 8000, 0.04, 1.5),
        row("jwt_authn", "hit-rs256", 12000, float("nan"), 1.0),
        row("lastguard", "hit-rs256", 3600, 0.33, 3.5),
        row("lastguard_http", "hit-rs256", 6000, 0.06, 2.0),
    ]
    items = {item["variant"]: item for item in summary.ratios(rows)}
    assert items["lastguard"]["rps_vs_noop"] == pytest.approx(0.9)
    assert items["lastguard_http"]["rps_vs_noop"] == pytest.approx(0.75)
    assert items["lastguard_http"]["cpu_vs_noop"] == pytest.approx(1.5)
    assert items["lastguard_http"]["paced_p99_minus_jwt_authn_ms"] == pytest.approx(1.0)
    verdicts = {t["target"]: t["pass"] for t in summary.targets(rows, list(items.values()), 55.0)}
    assert verdicts["lastguard hit-rs256: throughput >= 0.9x no-op"]
    assert not verdicts["lastguard_http hit-rs256: CPU per request <= 1.2x no-op"]
    assert verdicts["lastguard_http hit-rs256: p99 at 1k req/s within 2 ms of jwt_authn"]


def test_the_micro_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_micro.py"), "-n", "20", "--rounds", "1"],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache hit" in done.stdout


def _samples(rss: list[float]) -> list[Any]:
    return [
        soak_runs.Sample(result=None, elapsed=30.0 * (n + 1), rss_mb=mb, cpu_cores=0.5)
        for n, mb in enumerate(rss)
    ]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rss", "grew"),
    [
        pytest.param([130.0, 130.5, 129.8, 130.2, 130.1, 130.4], False, id="flat"),
        pytest.param([130.0, 131.0, 133.0, 135.0, 137.0, 139.0], True, id="climbing"),
        pytest.param([130.0, 130.0, 130.0, 130.0, 130.0, float("nan")], True, id="unreadable"),
    ],
)
def test_the_soak_verdict_tells_growth_from_noise(rss: list[float], grew: bool) -> None:
    verdict = soak_outcome.Verdict.of(_samples(rss))
    assert verdict.grew is grew


def test_the_no_op_floor_answers_both_protocols() -> None:
    import json
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench_noop.py"), "--http-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        listening = json.loads(proc.stdout.readline())
        request = urllib.request.Request(f"http://{listening['http']}/api", data=b"body")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://{listening['http']}/again", timeout=5) as response:
            assert response.status == 200
        with grpc.insecure_channel(listening["grpc"]) as channel:
            answer = pb_grpc.AuthorizationStub(channel).Check(pb.CheckRequest(), timeout=5)
        assert answer.status.code == 0 and answer.HasField("ok_response")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
