#!/usr/bin/env python3
"""Post-processing of one load-test run (loadtest/run.sh calls it).

Reads, from the run's results directory:
  raw.csv.gz      k6's raw samples (--out csv, K6_CSV_TIME_FORMAT=unix_milli)
  summary.json    k6's end-of-test summary (--summary-export): thresholds
  resources.csv   optional: the service process's RSS and CPU, sampled by
                  run.sh from /proc when it started the service itself

Writes there:
  timeseries.csv  per bucket and scenario: requests/s, p50/p95/p99, errors
  chart.png       throughput, latency and errors over time (and, when
                  measured, memory, CPU and the flusher's lag)
  chart.html      the same chart as inline SVG, with the summary: one file
  report.txt      the text summary, also printed
  max-rate.txt    stress only: the highest sustained rate (requests/s)
  windows.csv     stress only: each window's rate, p95 and errors

Exit status: 0 when the run passed (for stress: a sustained rate was
found), 1 otherwise (a threshold failed, k6 failed, or for soak memory or
lag did not stay flat). Needs only the standard library; the chart needs
matplotlib (pip install matplotlib) and is skipped with a warning without it.

usage: report.py RESULTS_DIR --profile PROFILE --k6-exit CODE
"""

import argparse
import csv
import datetime
import gzip
import io
import json
import math
import os
import re
import sys
from array import array
from collections import defaultdict

# Legends to the right of the panels, clear of the curves.
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1), "borderaxespad": 0}

REQUEST_METRICS = ("http_req_duration,", "http_req_failed,", "dropped_iterations,",
                   "service_rss_bytes,", "flusher_lag_seconds,")
# k6's exit codes that mean "the thresholds failed" (99) and "aborted by a
# threshold" (the same code): anything else non-zero is a failure of k6
# or of the script (setup, for one).
K6_THRESHOLDS_FAILED = 99


def env_num(name, default):
    value = os.environ.get(name, "")
    return float(value) if value else default


def k6_seconds(text):
    """A k6 duration ("20s", "1m30s", "500ms") in seconds."""
    total, matched = 0.0, ""
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        matched += m.group(0)
    if not matched or matched != text:
        raise ValueError(f"not a duration: {text}")
    return total


def percentile(sorted_values, p):
    """Nearest-rank-with-interpolation percentile of a sorted sequence (as k6)."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if n == 1:
        return sorted_values[0]
    k = (n - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def stats(values):
    s = sorted(values)
    return {
        "n": len(s),
        "p50": percentile(s, 50),
        "p95": percentile(s, 95),
        "p99": percentile(s, 99),
        "max": s[-1] if s else float("nan"),
    }


class Run:
    """The samples of one run, per scenario and second."""

    def __init__(self):
        self.t0 = None  # ms of the first request of any scenario
        self.t_end = None
        # scenario -> second -> latencies (ms)
        self.latency = defaultdict(lambda: defaultdict(lambda: array("f")))
        self.failed = defaultdict(lambda: defaultdict(int))  # scenario -> second -> failures
        self.dropped = defaultdict(lambda: defaultdict(int))  # scenario -> second -> dropped iterations
        self.statuses = defaultdict(lambda: defaultdict(int))  # scenario -> status -> count
        self.rss = []  # (ms, bytes) from /metrics
        self.lag = []  # (ms, seconds)
        self.proc = []  # (ms, rss bytes, cpu %) from resources.csv
        self.span_ms = {}  # scenario -> [first, last] request ms
        self._totals = {}

    @staticmethod
    def read(path):
        run = Run()
        raw = []  # (metric, ms, value, scenario, status, error_code)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", newline="") as f:
            header = next(csv.reader([f.readline()]))
            col = {name: i for i, name in enumerate(header)}
            i_ts, i_val = col["timestamp"], col["metric_value"]
            i_sc, i_st = col.get("scenario"), col.get("status")
            wanted = (line for line in f if line.startswith(REQUEST_METRICS))
            for row in csv.reader(wanted):
                scenario = row[i_sc] if i_sc is not None else "default"
                raw.append((row[0], int(float(row[i_ts])), float(row[i_val]), scenario,
                            row[i_st] if i_st is not None else ""))
        starts = [r[1] for r in raw if r[0] == "http_req_duration" and r[3]]
        if not starts:
            return run
        run.t0 = min(starts)
        run.t_end = max(r[1] for r in raw)
        for metric, ms, value, scenario, status in raw:
            if not scenario and metric != "service_rss_bytes" and metric != "flusher_lag_seconds":
                continue  # the setup stage's requests
            sec = (ms - run.t0) // 1000
            if metric == "http_req_duration":
                run.latency[scenario][sec].append(value)
                span = run.span_ms.setdefault(scenario, [ms, ms])
                span[0], span[1] = min(span[0], ms), max(span[1], ms)
                run.statuses[scenario][status or "none"] += 1
            elif metric == "http_req_failed":
                if value:
                    run.failed[scenario][sec] += 1
            elif metric == "dropped_iterations":
                run.dropped[scenario][sec] += int(value)
            elif metric == "service_rss_bytes":
                run.rss.append((ms, value))
            elif metric == "flusher_lag_seconds":
                run.lag.append((ms, value))
        return run

    def read_resources(self, path):
        """run.sh's samples of /proc/<pid>: unix ms, RSS bytes, CPU ticks."""
        if not os.path.exists(path):
            return
        rows = []
        with open(path) as f:
            for row in csv.reader(f):
                try:
                    rows.append((int(row[0]), int(row[1]), int(row[2])))
                except (ValueError, IndexError):
                    continue
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        for (t1, _, c1), (t2, rss, c2) in zip(rows, rows[1:]):
            if t2 > t1:
                self.proc.append((t2, rss, 100.0 * (c2 - c1) / hz / ((t2 - t1) / 1000.0)))

    def scenarios(self):
        return sorted(self.latency, key=lambda s: -sum(len(v) for v in self.latency[s].values()))

    def seconds(self):
        return 0 if self.t0 is None else (self.t_end - self.t0) // 1000 + 1

    def totals(self, scenario):
        if scenario in self._totals:
            return self._totals[scenario]
        every = array("f")
        for values in self.latency[scenario].values():
            every.extend(values)
        result = stats(every)
        result["failed"] = sum(self.failed[scenario].values())
        result["dropped"] = sum(self.dropped[scenario].values())
        first, last = self.span_ms.get(scenario, (0, 0))
        result["rate"] = result["n"] / max(1.0, (last - first) / 1000.0)
        self._totals[scenario] = result
        return result

    def buckets(self, scenario, width):
        """[(start s, requests/s, p50, p95, p99, error %, dropped/s)] per bucket of
        `width` s, over the seconds the scenario ran (a partial bucket at either
        end is counted over its own length)."""
        out = []
        secs = self.latency[scenario]
        if not secs:
            return out
        first, last = min(secs), max(secs)
        for b in range(first - first % width, last + 1, width):
            values = array("f")
            failed = dropped = 0
            for s in range(b, b + width):
                values.extend(secs.get(s, ()))
                failed += self.failed[scenario].get(s, 0)
                dropped += self.dropped[scenario].get(s, 0)
            span = min(b + width, last + 1) - max(b, first)
            if b + width > last and b > first:
                # The last bucket: counted up to the last request, and left
                # out when that is under half a bucket (a straggler or two).
                first_ms, last_ms = self.span_ms[scenario]
                span = (last_ms - self.t0) / 1000.0 - b
                if span < width / 2:
                    break
            st = stats(values)
            out.append((b, st["n"] / span, st["p50"], st["p95"], st["p99"],
                        100.0 * failed / st["n"] if st["n"] else 0.0, dropped / span))
        return out


def thresholds_of(summary):
    """[(metric, threshold, failed)] from k6's --summary-export (true = failed)."""
    out = []
    for metric, body in summary.get("metrics", {}).items():
        for source, failed in (body.get("thresholds") or {}).items():
            out.append((metric, source, bool(failed)))
    return sorted(out)


def p95_limits(thresholds):
    """scenario -> p95 limit (ms) from thresholds such as http_req_duration{scenario:x} p(95)<200."""
    limits = {}
    for metric, source, _ in thresholds:
        m = re.fullmatch(r"http_req_duration\{scenario:([^}]+)\}", metric)
        t = re.fullmatch(r"p\(95\)\s*<=?\s*([0-9.]+)", source)
        if m and t:
            limits[m.group(1)] = float(t.group(1))
    return limits


def stress_windows(run, scenario, window, limit):
    """Each window's achieved rate (2xx answers a second), p95 and errors; only
    a whole window (not the one the run stopped in) can have held."""
    out = []
    secs = run.latency[scenario]
    last = max(secs) if secs else -1
    w = 0
    while w * window <= last:
        values = array("f")
        failed = 0
        for s in range(w * window, (w + 1) * window):
            values.extend(secs.get(s, ()))
            failed += run.failed[scenario].get(s, 0)
        st = stats(values)
        whole = (w + 1) * window - 1 <= last
        length = window if whole else max(1, last + 1 - w * window)
        ok = st["n"] - failed
        out.append({"window": w, "start_s": w * window, "rate": ok / length, "p95": st["p95"],
                    "p99": st["p99"], "errors": failed, "whole": whole,
                    "held": whole and failed == 0 and st["n"] > 0 and st["p95"] <= limit})
        w += 1
    return out


def flatness(run, warmup_s, growth_pct, lag_p99_s):
    """Soak: memory and lag flat. Returns (lines, ok)."""
    lines, ok = [], True
    if run.rss:
        series, source = [(t, v) for t, v in run.rss], "process_resident_memory_bytes"
    elif run.proc:
        series, source = [(t, r) for t, r, _ in run.proc], "/proc (run.sh)"
    else:
        series, source = [], None
    span = run.seconds()
    warm = min(warmup_s, span / 4.0)
    if series:
        rel = [((t - run.t0) / 1000.0, v) for t, v in series]
        base = sorted(v for s, v in rel if warm <= s < warm + 60) or [rel[0][1]]
        end = sorted(v for s, v in rel if s >= span - 60) or [rel[-1][1]]
        b, e = base[len(base) // 2], end[len(end) // 2]
        growth = 100.0 * (e / b - 1) if b else 0.0
        held = growth <= growth_pct
        ok &= held
        lines.append(f"memory ({source}): {b / 1e6:.1f} MB after {warm:.0f} s, {e / 1e6:.1f} MB at the end: "
                     f"{growth:+.1f} % (limit +{growth_pct:g} %) {'flat' if held else 'GREW'}")
    else:
        lines.append("memory: not measured (no process_resident_memory_bytes in /metrics and no "
                     "service process of run.sh's own): WARNING, not checked")
    if run.lag:
        lags = sorted(v for _, v in run.lag)
        p99 = percentile(lags, 99)
        held = p99 < lag_p99_s
        ok &= held
        lines.append(f"flusher lag: p99 {p99:.2f} s, max {lags[-1]:.2f} s (limit p99 < {lag_p99_s:g} s) "
                     f"{'flat' if held else 'TOO HIGH'}")
    else:
        lines.append("flusher lag: not measured (no usage_stream_oldest_unflushed_seconds at METRICS_URL): "
                     "WARNING, not checked")
    return lines, ok


def fmt_ms(v):
    if v != v:  # NaN
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def chart(run, profile, title, bucket, limits, stress_info, path_png, path_html, text):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("report: matplotlib is missing (pip install matplotlib): no chart", file=sys.stderr)
        return False
    scenarios = run.scenarios()
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(scenarios)}
    minutes = run.seconds() > 900
    scale = 60.0 if minutes else 1.0
    xlabel = "minutes since start" if minutes else "seconds since start"
    have_mem = bool(run.rss or run.proc)
    have_lag = bool(run.lag)
    panels = 3 + have_mem + have_lag
    fig, axes = plt.subplots(panels, 1, figsize=(13, 2.7 * panels + 0.6), sharex=True)
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    series = {s: run.buckets(s, bucket) for s in scenarios}

    ax = axes[0]
    for s in scenarios:
        if run.totals(s)["rate"] * bucket < 1:
            continue  # a scrape every few seconds: shown in the latency panel
        xs = [(b + bucket / 2) / scale for b, *_ in series[s]]
        ax.plot(xs, [r for _, r, *_ in series[s]], color=colors[s], lw=1.4, label=s)
        if any(d for *_, d in series[s]):
            ax.plot(xs, [d for *_, d in series[s]], color=colors[s], lw=1, ls=":",
                    label=f"{s}: dropped/s (k6 out of VUs)")
    if stress_info:
        start, step, step_s, top = stress_info["start"], stress_info["step"], stress_info["step_s"], stress_info["max"]
        xs, ys = [], []
        for t in range(0, run.seconds() + 1):
            xs.append(t / scale)
            ys.append(min(top, start + step * int(t // step_s)))
        ax.plot(xs, ys, color="grey", lw=1, ls="--", drawstyle="steps-post", label="target rate")
        if stress_info.get("best"):
            ax.axhline(stress_info["best"], color="green", lw=1, ls="-.",
                       label=f"highest sustained: {stress_info['best']:.0f}/s")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0, top=max([1.0] + [max(line.get_ydata()) for line in ax.get_lines()
                                          if len(line.get_ydata())]) * 1.15)
    ax.set_title(f"Throughput (per {bucket} s)", fontsize=10, loc="left")
    ax.legend(fontsize=8, **OUTSIDE)
    ax.grid(alpha=0.3)

    ax = axes[1]
    top = 0.0
    for s in scenarios:
        # About 30 requests per point, so a percentile means something,
        # and still at least 8 points over the run.
        rate = run.totals(s)["rate"] or 1
        if rate * bucket < 2:
            # Sparse (a scrape every few seconds): each request, as a dot.
            points = sorted((sec + 0.5, v) for sec, values in run.latency[s].items() for v in values)
            ax.plot([x / scale for x, _ in points], [v for _, v in points], color=colors[s], ls="none",
                    marker="o", ms=3, label=f"{s}, each request")
            top = max([top] + [v for _, v in points])
            continue
        width = max(bucket, min(120, math.ceil(30 / rate), run.seconds() // 8))
        rows = [r for r in run.buckets(s, width) if r[1] > 0]
        xs = [(b + width / 2) / scale for b, *_ in rows]
        marker = "." if len(rows) < 30 else None
        for q, idx, lw, ls in (("p50", 2, 1, ":"), ("p95", 3, 1.6, "-"), ("p99", 4, 1, "--")):
            ys = [r[idx] for r in rows]
            top = max([top] + ys)
            ax.plot(xs, ys, color=colors[s], lw=lw, ls=ls, marker=marker, ms=4,
                    label=f"{s} {q}" + (f" (per {width} s)" if width != bucket and q == "p50" else ""))
    by_limit = defaultdict(list)
    for s in scenarios:
        if s in limits:
            by_limit[limits[s]].append(s)
    for limit, names in sorted(by_limit.items()):
        top = max(top, limit)
        color = colors[names[0]] if len(names) == 1 else "grey"
        ax.axhline(limit, color=color, lw=1, ls=(0, (6, 4)), alpha=0.8)
        ax.annotate(f"{', '.join(names)}: p95 limit {limit:g} ms", (0, limit), fontsize=7, color=color,
                    xytext=(4, 2), textcoords="offset points")
    if stress_info:
        top = max(top, stress_info["limit"])
        ax.axhline(stress_info["limit"], color="red", lw=1, ls=(0, (6, 4)))
        ax.annotate(f"p95 limit {stress_info['limit']:g} ms", (0, stress_info["limit"]), fontsize=7,
                    color="red", xytext=(4, 2), textcoords="offset points")
    # Latencies span orders of magnitude (and sit far below their limits):
    # a log scale shows both.
    ax.set_yscale("log")
    ax.set_ylim(top=top * 2 if top > 0 else None)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("ms (log scale)")
    ax.set_title(f"Latency: p50 (dotted), p95 (solid), p99 (dashed), per {bucket} s", fontsize=10, loc="left")
    ax.legend(fontsize=7, **OUTSIDE)
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")

    ax = axes[2]
    any_error = False
    for s in scenarios:
        xs = [(b + bucket / 2) / scale for b, *_ in series[s]]
        ys = [r[5] for r in series[s]]
        any_error |= any(ys)
        ax.plot(xs, ys, color=colors[s], lw=1.4, label=s)
    ax.set_ylabel("% failed")
    ax.set_ylim(bottom=0, top=None if any_error else 1)
    ax.set_title("Errors: share of requests failed (non-2xx or no answer)"
                 + ("" if any_error else ": none"), fontsize=10, loc="left")
    ax.legend(fontsize=8, **OUTSIDE)
    ax.grid(alpha=0.3)

    i = 3
    if have_mem:
        ax = axes[i]
        i += 1
        if run.rss:
            ax.plot([(t - run.t0) / 1000 / scale for t, _ in run.rss], [v / 1e6 for _, v in run.rss],
                    color="tab:purple", lw=1.4, label="RSS (process_resident_memory_bytes)")
        elif run.proc:
            ax.plot([(t - run.t0) / 1000 / scale for t, _, _ in run.proc], [r / 1e6 for _, r, _ in run.proc],
                    color="tab:purple", lw=1.4, label="RSS (/proc)")
        ax.set_ylabel("MB")
        mem = [v for _, v in run.rss] or [r for _, r, _ in run.proc]
        ax.set_ylim(bottom=0, top=max(mem) / 1e6 * 1.2)
        ax.grid(alpha=0.3)
        panel_title = "Service memory (RSS)"
        if run.proc:
            cpu = ax.twinx()
            cpu.plot([(t - run.t0) / 1000 / scale for t, _, _ in run.proc], [c for _, _, c in run.proc],
                     color="tab:brown", lw=1, alpha=0.7, label="CPU % (/proc)")
            cpu.set_ylabel("CPU %")
            cpu.set_ylim(bottom=0, top=max(c for _, _, c in run.proc) * 1.2 + 1)
            panel_title += " and CPU (100 % = one core)"
        handles = ax.get_legend_handles_labels()[0] + (cpu.get_legend_handles_labels()[0] if run.proc else [])
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.06, 1), borderaxespad=0)
        ax.set_title(panel_title, fontsize=10, loc="left")
    if have_lag:
        ax = axes[i]
        ax.plot([(t - run.t0) / 1000 / scale for t, _ in run.lag], [v for _, v in run.lag],
                color="tab:red", lw=1.4, label="oldest unflushed event, worst shard")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0, top=max(v for _, v in run.lag) * 1.2 + 0.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, **OUTSIDE)
        ax.set_title("Flusher lag (usage_stream_oldest_unflushed_seconds)", fontsize=10, loc="left")
    axes[-1].set_xlabel(xlabel)
    axes[-1].set_xlim(left=0)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path_png, dpi=110)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    plt.close(fig)
    svg_text = svg.getvalue()
    svg_text = svg_text[svg_text.find("<svg"):]
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    with open(path_html, "w") as f:
        f.write("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{title}</title><style>body{{font-family:sans-serif;margin:1em}}"
                "pre{background:#f6f6f6;padding:.8em}svg{max-width:100%;height:auto}</style></head><body>\n"
                f"<h1 style=\"font-size:1.2em\">{title}</h1>\n<pre>{escaped}</pre>\n{svg_text}\n</body></html>\n")
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--k6-exit", type=int, default=0)
    ap.add_argument("--base-url", default=os.environ.get("BASE_URL", ""))
    args = ap.parse_args()
    d = args.dir
    raw_path = os.path.join(d, "raw.csv.gz")
    if not os.path.exists(raw_path):
        print(f"report: no {raw_path}: k6 wrote no samples", file=sys.stderr)
        return 1
    run = Run.read(raw_path)
    run.read_resources(os.path.join(d, "resources.csv"))
    summary = {}
    if os.path.exists(os.path.join(d, "summary.json")):
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
    thresholds = thresholds_of(summary)
    failed_thresholds = [(m, s) for m, s, failed in thresholds if failed]
    limits = p95_limits(thresholds)

    lines = []
    span = run.seconds()
    lines.append(f"profile {args.profile} against {args.base_url or '?'}: {span} s of load")
    if run.t0 is None:
        lines.append("no request was sent (setup failed? see k6.log)")
    lines.append(f"{'scenario':<12} {'requests':>9} {'rate/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
                 f"{'p99 ms':>7} {'max ms':>7} {'failed':>12} {'dropped':>8}")
    for s in run.scenarios():
        t = run.totals(s)
        share = 100.0 * t["failed"] / t["n"] if t["n"] else 0.0
        lines.append(f"{s:<12} {t['n']:>9,} {t['rate']:>8.1f} {fmt_ms(t['p50']):>7} {fmt_ms(t['p95']):>7} "
                     f"{fmt_ms(t['p99']):>7} {fmt_ms(t['max']):>7} {t['failed']:>5} ({share:.2f}%) "
                     f"{t['dropped']:>8}")
        codes = ", ".join(f"{code}: {n:,}" for code, n in sorted(run.statuses[s].items()))
        lines.append(f"{'':<12} statuses {codes}")
    if any("429" in run.statuses[s] for s in run.statuses):
        lines.append("429s: a rate limit of the service was hit; see loadtest/README.md, \"Rate limits\"")

    ok = True
    stress_info = None
    if args.profile == "stress":
        step_duration = os.environ.get("STRESS_STEP_DURATION") or "20s"
        window = max(1, round(k6_seconds(os.environ.get("STRESS_WINDOW") or step_duration)))
        limit = env_num("STRESS_P95_MS", 2)
        windows = stress_windows(run, "stress", window, limit)
        held = [w for w in windows if w["held"]]
        best = max(held, key=lambda w: w["rate"]) if held else None
        with open(os.path.join(d, "windows.csv"), "w") as f:
            f.write("window,start_s,rate_per_s,p95_ms,p99_ms,errors,whole,held\n")
            for w in windows:
                f.write(f"{w['window']},{w['start_s']},{w['rate']:.1f},{w['p95']:.3f},{w['p99']:.3f},"
                        f"{w['errors']},{int(w['whole'])},{int(w['held'])}\n")
        stress_info = {"start": env_num("STRESS_START", 500), "step": env_num("STRESS_STEP", 250),
                       "step_s": k6_seconds(step_duration), "max": env_num("STRESS_MAX", 20000),
                       "limit": limit, "best": best["rate"] if best else None}
        if best:
            with open(os.path.join(d, "max-rate.txt"), "w") as f:
                f.write(f"{int(best['rate'])}\n")
            lines.append(f"highest sustained rate: {best['rate']:,.0f} requests/s "
                         f"(window of {window} s from {best['start_s']} s: p95 {best['p95']:.2f} ms "
                         f"<= {limit:g} ms, no error); saved to max-rate.txt")
        else:
            ok = False
            lines.append(f"no window held p95 <= {limit:g} ms without errors, not even the first")
        broke = next((w for w in windows if not w["held"]), None)
        if broke:
            why = f"{broke['errors']} errors" if broke["errors"] else f"p95 {broke['p95']:.2f} ms"
            lines.append(f"first window that did not hold: from {broke['start_s']} s at "
                         f"{broke['rate']:,.0f}/s ({why}{'' if broke['whole'] else ', where the run stopped'})")
        # Aborting on the window thresholds is how the stress ends.
        if args.k6_exit not in (0, K6_THRESHOLDS_FAILED):
            ok = False
            lines.append(f"k6 exited with {args.k6_exit}: not a threshold's abort (see k6.log)")
    else:
        if failed_thresholds:
            ok = False
            for metric, source in failed_thresholds:
                lines.append(f"threshold FAILED: {metric} {source}")
        elif thresholds:
            lines.append(f"thresholds: all {len(thresholds)} held")
        if args.k6_exit != 0:
            ok = False
            if not failed_thresholds:
                lines.append(f"k6 exited with {args.k6_exit} (see k6.log)")
    if args.profile == "soak" or (run.lag or run.rss):
        flat_lines, flat_ok = flatness(run, k6_seconds(os.environ.get("SOAK_WARMUP") or "5m"),
                                       env_num("SOAK_RSS_GROWTH_PCT", 25), env_num("SOAK_LAG_P99_S", 5))
        if args.profile == "soak":
            lines.extend(flat_lines)
            ok &= flat_ok
        else:
            lines.extend(line.split(" (limit")[0] if "(limit" in line else line
                         for line in flat_lines if "not measured" not in line)
    lines.append(f"verdict: {'PASS' if ok else 'FAIL'}")
    text = "\n".join(lines)

    bucket = int(env_num("CHART_BUCKET", 0)) or max(1, math.ceil(span / 400))
    with open(os.path.join(d, "timeseries.csv"), "w") as f:
        f.write("start_s,scenario,requests_per_s,p50_ms,p95_ms,p99_ms,failed_pct,dropped_per_s\n")
        for s in run.scenarios():
            for b, rate, p50, p95, p99, err, dropped in run.buckets(s, bucket):
                q = ",".join("" if v != v else f"{v:.3f}" for v in (p50, p95, p99))  # none: empty
                f.write(f"{b},{s},{rate:.2f},{q},{err:.3f},{dropped:.2f}\n")
    started = datetime.datetime.fromtimestamp(run.t0 / 1000, datetime.timezone.utc) if run.t0 else None
    title = (f"loadtest {args.profile}"
             + (f", {started:%Y-%m-%d %H:%M} UTC" if started else "")
             + f", against {args.base_url or '?'}: {'PASS' if ok else 'FAIL'}")
    try:
        if run.t0 is not None and chart(run, args.profile, title, bucket, limits, stress_info,
                                        os.path.join(d, "chart.png"), os.path.join(d, "chart.html"), text):
            text += f"\nchart: {os.path.join(d, 'chart.png')} and chart.html"
    except Exception as e:  # a chart that fails must not hide the verdict
        text += f"\nchart: failed ({type(e).__name__}: {e})"
    with open(os.path.join(d, "report.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
