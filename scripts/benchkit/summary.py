"""What the runs add up to: medians per row, the ratios, the targets, and the printed tables.

No I/O but printing and reading an earlier results.json (`reprint`): the same
results print the same tables, whether just measured or read back later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchkit import config, plan, runner


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _share(runs: Sequence[runner.RunResult]) -> float:
    hits = sum(r.cache_hits for r in runs)
    lookups = hits + sum(r.cache_misses for r in runs)
    return hits / lookups if lookups else math.nan


@dataclass
class Row:
    variant: str
    case: str
    rps: float
    p50_ms: float
    p99_ms: float
    paced_rps: float
    paced_p99_ms: float
    server_cpu_s_per_1k: float  # the ext_authz server's (lastguard or noop); NaN otherwise
    envoy_cpu_s_per_1k: float
    paced_server_cpu_s_per_1k: float
    cache_hit_share: float  # lastguard's token cache, saturated and paced runs together
    runs: int
    #: Runs left out of the medians: other processes disturbed them, and quiet ones exist.
    left_out: int
    problems: list[str]


def _quiet(runs: Sequence[runner.RunResult]) -> list[runner.RunResult]:
    """The runs no other process disturbed, if there are any; else all of them."""
    return [r for r in runs if r.other_cores <= config.OTHER_LOAD_NOTICE] or list(runs)


def summarize(results: Sequence[runner.RunResult]) -> list[Row]:
    """Medians per variant and case, of the quiet runs where there are some."""
    rows = []
    for variant, case in plan.RUN_ORDER:
        mine = [r for r in results if (r.spec.variant, r.spec.case) == (variant, case)]
        if not mine:
            continue
        sat = _quiet([r for r in mine if r.spec.mode == "saturate"])
        paced = _quiet([r for r in mine if r.spec.mode == "paced"])
        server = plan.SERVER_OF.get(variant)

        def cpu(runs: Sequence[runner.RunResult], process: str | None) -> float:
            return _median([r.cpu_per_1k(process) for r in runs]) if process else math.nan

        rows.append(
            Row(
                variant=variant,
                case=case,
                rps=_median([r.rps for r in sat]),
                p50_ms=_median([r.p50_ms for r in sat]),
                p99_ms=_median([r.p99_ms for r in sat]),
                paced_rps=_median([r.rps for r in paced]),
                paced_p99_ms=_median([r.p99_ms for r in paced]),
                server_cpu_s_per_1k=cpu(sat, server),
                envoy_cpu_s_per_1k=cpu(sat, "envoy"),
                paced_server_cpu_s_per_1k=cpu(paced, server),
                cache_hit_share=_share(mine),
                runs=len(mine),
                left_out=len(mine) - len(sat) - len(paced),
                problems=[
                    f"{r.spec.mode} round {r.spec.round + 1}: {problem}"
                    for r in mine
                    for problem in r.problems
                ],
            )
        )
    return rows


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def print_table(rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = right or [False] * len(widths)
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def results_table(rows: Sequence[Row]) -> None:
    header = (
        "variant", "case", "req/s", "p50 ms", "p99 ms", "p99 ms @1k/s", "(rate)",
        "authz CPU s/1k", "@1k/s", "Envoy CPU s/1k", "cache hits", "valid",
    )  # fmt: skip
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.variant,
                row.case,
                _fmt(row.rps, ",.0f"),
                _fmt(row.p50_ms, ".2f"),
                _fmt(row.p99_ms, ".2f"),
                _fmt(row.paced_p99_ms, ".2f"),
                _fmt(row.paced_rps, ",.0f"),
                _fmt(row.server_cpu_s_per_1k, ".3f"),
                _fmt(row.paced_server_cpu_s_per_1k, ".3f"),
                _fmt(row.envoy_cpu_s_per_1k, ".3f"),
                _fmt(100 * row.cache_hit_share, ".0f") + ("%" if row.cache_hit_share >= 0 else ""),
                "yes" if not row.problems else "NO",
            )
        )
    print_table(lines, right=[False, False, *[True] * 9, False])


def _row(rows: Sequence[Row], variant: str, case: str) -> Row | None:
    return next((r for r in rows if (r.variant, r.case) == (variant, case)), None)


def _jwt_authn_peer(case: str) -> str:
    """jwt_authn's row to compare a lastguard case with: same algorithm, or the denial."""
    return {"deny": "deny", "hit-es256": "hit-es256", "miss-es256": "hit-es256"}.get(
        case, "hit-rs256"
    )


def ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Each lastguard row against its protocol's no-op floor and against jwt_authn."""
    out = []
    for row in rows:
        if row.variant not in plan.FLOOR_OF:
            continue
        noop = _row(rows, plan.FLOOR_OF[row.variant], "hit-rs256")
        peer = _row(rows, "jwt_authn", _jwt_authn_peer(row.case))
        out.append(
            {
                "variant": row.variant,
                "case": row.case,
                "rps_vs_noop": row.rps / noop.rps if noop else math.nan,
                "cpu_vs_noop": row.server_cpu_s_per_1k / noop.server_cpu_s_per_1k
                if noop
                else math.nan,
                "jwt_authn_case": peer.case if peer else None,
                "rps_vs_jwt_authn": row.rps / peer.rps if peer else math.nan,
                "paced_p99_minus_jwt_authn_ms": row.paced_p99_ms - peer.paced_p99_ms
                if peer
                else math.nan,
                "paced_p99_minus_noop_ms": row.paced_p99_ms - noop.paced_p99_ms
                if noop
                else math.nan,
            }
        )
    return out


def ratios_table(items: Sequence[dict[str, Any]]) -> None:
    lines = [
        (
            "variant", "case", "req/s / no-op", "CPU / no-op", "p99 @1k/s - no-op",
            "req/s / jwt_authn", "p99 @1k/s - jwt_authn", "(jwt_authn case)",
        )
    ]  # fmt: skip
    for item in items:
        lines.append(
            (
                item.get("variant", "lastguard"),
                item["case"],
                _fmt(item["rps_vs_noop"], ".2f") + "x",
                _fmt(item["cpu_vs_noop"], ".2f") + "x",
                _fmt(item["paced_p99_minus_noop_ms"], "+.2f") + " ms",
                _fmt(item["rps_vs_jwt_authn"], ".3f") + "x",
                _fmt(item["paced_p99_minus_jwt_authn_ms"], "+.2f") + " ms",
                item["jwt_authn_case"] or "-",
            )
        )
    print_table(lines, right=[False, False, True, True, True, True, True, False])


def targets(
    rows: Sequence[Row], items: Sequence[dict[str, Any]], idle_rss: float
) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and pass or FAIL."""
    out: list[dict[str, Any]] = []

    def target(name: str, value: float, limit: float, unit: str, higher_is_better: bool) -> None:
        passed = value >= limit if higher_is_better else value <= limit
        out.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "unit": unit,
                "pass": bool(passed and not math.isnan(value)),
            }
        )

    for item in items:
        name = f"{item.get('variant', 'lastguard')} {item['case']}"
        if item["case"] in ("hit-rs256", "hit-es256"):
            target(f"{name}: CPU per request <= 1.2x no-op", item["cpu_vs_noop"], 1.2, "x", False)
            target(f"{name}: throughput >= 0.9x no-op", item["rps_vs_noop"], 0.9, "x", True)
    for item in items:
        if item["case"] != "deny":
            target(
                f"{item.get('variant', 'lastguard')} {item['case']}: p99 at 1k req/s within "
                "2 ms of jwt_authn",
                item["paced_p99_minus_jwt_authn_ms"], 2.0, "ms", False,
            )  # fmt: skip
    for variant in plan.FLOOR_OF:
        hit, miss = _row(rows, variant, "hit-rs256"), _row(rows, variant, "miss-rs256")
        if hit and miss:
            target(
                f"{variant} miss-rs256: throughput >= 0.45x hit-rs256",
                miss.rps / hit.rps, 0.45, "x", True,
            )  # fmt: skip
    target("lastguard idle RSS < 60 MB", idle_rss, 60.0, "MB", False)
    return out


def targets_table(items: Sequence[dict[str, Any]]) -> None:
    lines = [("target", "measured", "result")]
    for item in items:
        unit = item["unit"]
        measured = _fmt(item["value"], ".2f") + ("x" if unit == "x" else f" {unit}")
        lines.append((item["target"], measured, "pass" if item["pass"] else "FAIL"))
    print_table(lines, right=[False, True, False])


def print_report(
    settings: config.Settings, results: Sequence[runner.RunResult], rss: Mapping[str, float]
) -> bool:
    """Prints the tables, the memory line, the targets and notes; True if every run was valid."""
    rows = summarize(results)
    items = ratios(rows)
    print()
    print(
        f"medians of {settings.rounds} interleaved rounds, {settings.duration}s per run; "
        f"Envoy --concurrency 1, routes answer 200 themselves (direct_response)"
    )
    results_table(rows)
    print()
    print(
        "lastguard against its protocol's floor (no-op ext_authz server: gRPC for lastguard, "
        "HTTP for lastguard_http) and Envoy's native jwt_authn"
    )
    ratios_table(items)
    fresh_sent = sum(
        round(r.requests * plan.CASES[r.spec.case].fresh_share)
        for r in results
        if r.spec.variant in plan.FLOOR_OF
    )
    print()
    print(
        f"lastguard RSS: {rss['lastguard_idle']:.1f} MB idle, {rss['lastguard_after']:.1f} MB "
        f"after the runs ({fresh_sent:,} distinct tokens verified, token cache at its default "
        f"bounds); no-op server: {rss['noop_idle']:.1f} MB idle, {rss['noop_after']:.1f} MB after"
    )
    print()
    targets_table(targets(rows, items, rss["lastguard_idle"]))
    repeated = sum(r.attempts > 1 for r in results)
    shared = [r for r in results if r.other_cores > config.OTHER_LOAD_NOTICE]
    left_out = sum(row.left_out for row in rows)
    if repeated or shared:
        print(
            f"\nnote: other processes shared the cores: {repeated} of {len(results)} runs were "
            f"made again; {len(shared)} of the runs kept were still disturbed (more than "
            f"{config.OTHER_LOAD_NOTICE} cores busy elsewhere), {left_out} of them left out of the "
            "medians for a quiet run of the same row; other_cores in results.json"
        )
    invalid = [(row, p) for row in rows for p in row.problems]
    for row, problem in invalid:
        print(f"INVALID {row.variant} {row.case}: {problem}", file=sys.stderr)
    return not invalid


def reprint(path: Path) -> int:
    """`--report`: the tables of an earlier run, from its results.json."""
    data = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(config.Settings)}
    settings = config.Settings(**{k: v for k, v in data["settings"].items() if k in known})
    results = []
    for item in data["runs"]:
        fields: dict[str, Any] = {
            k: math.nan if v is None else v for k, v in item.items() if k != "spec"
        }
        results.append(runner.RunResult(spec=plan.RunSpec(**item["spec"]), **fields))
    env = data["environment"]
    print(f"{path}: lastguard {env['lastguard']}, Envoy {env['envoy']}, {env['wrk']}")
    print(f"{env['cpu']} x {env['cpus']}, Python {env['python']}, grpcio {env['grpcio']}")
    return 0 if print_report(settings, results, data["rss_mb"]) else 1


def no_nan(value: Any) -> Any:
    """JSON has no NaN: a value that could not be measured is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value
