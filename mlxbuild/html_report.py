"""`mlxbuild report`: one self-contained HTML page for a build (its ``--report`` JSON) or a
release (its ``release.lock.json``): every target's size, quality against the float model
and build-host speed, in a table and in charts; what each layer rule of a mixed scheme
costs; and, for a build, the step timeline with each step's time, peak memory and cache
hit.

Charts are Plotly's (``plotly.graph_objects``): a well-kept library whose figures are
interactive (hover a point for its target and figures, zoom, hide a series) with no
server, and whose JavaScript bundle ships inside the Python package, so the page embeds
it once and opens offline, as a CI artifact or an attachment. Matplotlib would give
static pictures; Bokeh and Altair fetch their scripts from a CDN unless told otherwise
and Altair needs a second package to inline them. The price is the bundle: pages are
about 5 MB whatever the build's size.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path

from mlxbuild.errors import BuildError

FORMAT_BUILD = "mlxbuild-build-report/1"
CACHE_COLOURS = {"built": "#4c78a8", "remote": "#72b7b2", "hit": "#bab0ac", "failed": "#e45756",
                 "not run": "#eeeeee"}
PAGE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
 padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#2a7d2a} .bad{color:#b22} .muted{color:#888} .chart{min-height:380px}
"""


# --------------------------------------------------------------------------- inputs


def load(path: Path) -> dict:
    """The page's data from a build report JSON, a release lock, or a version folder
    holding one: {"kind", "title", "subtitle", "targets": [...], "steps": [...] | None}.
    Raises BuildError naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        lock = path / "release.lock.json"
        if not lock.is_file():
            raise BuildError(f"{path}: no release.lock.json in this folder (run `doit release` first, "
                             "or pass a build's --report JSON)")
        path = lock
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: cannot read it: {e}") from None
    except ValueError as e:
        raise BuildError(f"{path}: not JSON ({e})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT_BUILD:
        return _from_build(data, path)
    if isinstance(data, dict) and "targets" in data and "manifest" in data:
        return _from_lock(data, path)
    raise BuildError(f"{path}: neither a build report ({FORMAT_BUILD}, from `doit build --report`) "
                     "nor a release lock (release.lock.json)")


def _from_build(rep: dict, path: Path) -> dict:
    targets, steps = [], {}
    for m in rep.get("manifests") or []:
        for t in m.get("targets") or []:
            files = t.get("files") or {}
            targets.append(_row(f"{m.get('name')}/{t['target']}", t, files, t.get("status")))
            for s in t.get("steps") or []:
                steps.setdefault(s["task"], s)
    c = rep.get("counts") or {}
    started = rep.get("started") or ""
    subtitle = (f"build started {started[:19].replace('T', ' ')} UTC, {_secs(rep.get('seconds'))}, "
                f"exit {rep.get('exit_code')} ({rep.get('result')}): {c.get('built', 0)} built, "
                f"{c.get('up-to-date', 0)} up to date, {c.get('failed', 0)} failed, {c.get('not-run', 0)} not run")
    names = sorted({m.get("name") or m.get("path") for m in rep.get("manifests") or []})
    error = rep.get("error")
    return {"kind": "build", "title": f"mlxbuild build: {', '.join(names) or 'nothing planned'}",
            "subtitle": subtitle, "targets": targets, "steps": list(steps.values()), "cache": rep.get("cache"),
            "error": f"{error['kind']} error: {error['message']}" if error else None, "source": str(path)}


def _from_lock(lock: dict, path: Path) -> dict:
    targets = [_row(f"{lock.get('name')}/{name}", t, t.get("files") or {}, "released")
               for name, t in sorted((lock.get("targets") or {}).items())]
    return {"kind": "release", "title": f"mlxbuild release: {lock.get('name')} {lock.get('version')}",
            "subtitle": f"{len(targets)} targets locked in {path.name}; a release lock keeps no step "
                        "timeline (pass the build's --report JSON for one)",
            "targets": targets, "steps": None, "error": None, "source": str(path),
            "stem": f"{lock.get('name')}-{lock.get('version')}"}


def _row(name: str, t: dict, files: dict, status: str | None) -> dict:
    """One target, as the tables and charts read it."""
    q = t.get("quality") or {}
    v = t.get("verification") or {}
    speed = t.get("speed") or q.get("speed") or {}
    # What a device downloads: the program and its weights' data files, not the tokenizer.
    shipped = {f: i for f, i in files.items() if str(f).endswith((".pte", ".ptd"))}
    size = sum(i.get("size") or 0 for i in shipped.values()) or t.get("size")
    failure = t.get("failure") or {}
    return {"name": name, "backend": t.get("backend"), "scheme": t.get("scheme"), "dtype": t.get("dtype"),
            "status": status, "failure": failure.get("message"), "size": size,
            "kld_mean": q.get("kld_mean"), "kld_p99": q.get("kld_p99"), "top1": q.get("top1"),
            "top1_decisive": q.get("top1_decisive"), "ppl_float": q.get("ppl_float"), "ppl": q.get("ppl"),
            "ppl_increase": q.get("ppl_increase"), "quality_passed": q.get("passed"),
            "quality_note": None if q.get("kld_mean") is not None else q.get("reason"),
            "gate": q.get("gate") or {}, "rules": q.get("rules") or {},
            "prefill": speed.get("prefill_tokens_per_s"), "decode": speed.get("decode_tokens_per_s"),
            "speed_host": speed.get("host"), "max_rel_error": v.get("max_rel_error"),
            "verified": v.get("passed")}


# --------------------------------------------------------------------------- charts


def _figures(data: dict) -> list[tuple[str, str, object | None]]:
    """(heading, note, plotly figure or None when there is nothing to draw)."""
    import plotly.graph_objects as go

    rows = data["targets"]
    out = []
    measured = [r for r in rows if r["kld_mean"] is not None and r["size"]]
    fig = None
    if measured:
        fig = go.Figure()
        for backend in sorted({r["backend"] for r in measured}):
            mine = [r for r in measured if r["backend"] == backend]
            fig.add_trace(go.Scatter(
                x=[r["size"] / 2**20 for r in mine], y=[max(r["kld_mean"], 1e-12) for r in mine],
                mode="markers+text", name=backend, text=[r["name"].split("/", 1)[-1] for r in mine],
                textposition="top center",
                marker={"size": [_marker(r["decode"], measured) for r in mine], "line": {"width": 1}},
                customdata=[[r["name"], r["scheme"], _pct(r["top1"]), _rate(r["decode"])] for r in mine],
                hovertemplate="%{customdata[0]} (%{customdata[1]})<br>%{x:.3f} MB, KLD %{y:.3g}<br>"
                              "top-1 %{customdata[2]}, decode %{customdata[3]}<extra></extra>"))
        fig.update_layout(xaxis_title="size of .pte + .ptd (MB)", yaxis_title="KL divergence vs float (nats)",
                          yaxis_type="log", yaxis_exponentformat="power", legend_title="backend", margin={"t": 30})
    out.append(("Size against quality", "Lower and further left is better; a larger marker decodes "
                "faster on the build host, where speed was measured.", fig))

    fast = [r for r in rows if r["prefill"] or r["decode"]]
    fig = None
    if fast:
        fig = go.Figure([go.Bar(name=kind, x=[r["name"] for r in fast], y=[r[kind] or 0 for r in fast],
                                hovertemplate="%{x}: %{y:.1f} tokens/s<extra>" + kind + "</extra>")
                         for kind in ("prefill", "decode")])
        fig.update_layout(barmode="group", yaxis_title="tokens per second (build host)", margin={"t": 30})
    out.append(("Speed on the build host", "Medians of a few runs on the machine that built them "
                "(host and load average in each record), not device figures." if fast else
                "Not measured: build with `doit build --measure-speed` (or `quality: {measure_speed: true}`).",
                fig))

    ruled = [(r, key, fig_) for r in rows for key, fig_ in r["rules"].items()]
    if ruled:
        fig = go.Figure()
        for r in dict.fromkeys(x[0]["name"] for x in ruled):
            mine = [(key, f) for row, key, f in ruled if row["name"] == r]
            fig.add_trace(go.Bar(name=r, orientation="h", y=[f"{key}: {f['quantization']}" for key, f in mine],
                                 x=[f["kld_mean"] for _, f in mine],
                                 customdata=[[f["rule"], f["layers"], _pct(f.get("top1"))] for _, f in mine],
                                 hovertemplate="%{customdata[0]}<br>%{customdata[1]} layers, KLD %{x:.3g}, "
                                               "top-1 %{customdata[2]}<extra>" + r + "</extra>"))
        fig.update_layout(barmode="group", xaxis_title="KL divergence vs float, this rule's layers alone",
                          xaxis_type="log", xaxis_exponentformat="power",
                          margin={"t": 30, "l": 10}, yaxis={"automargin": True})
        out.append(("Quality per layer rule", "Mixed-precision schemes: the float model with only one "
                    "rule's layers quantized (eager torch), so the rule that costs the most stands out.", fig))

    steps = data["steps"]
    if steps is not None:
        _name_steps(steps)
        timed = [s for s in steps if s.get("start") is not None and s.get("seconds") is not None]
        fig = None
        if timed:
            timed.sort(key=lambda s: s["start"])
            fig = go.Figure()
            for state in CACHE_COLOURS:
                mine = [s for s in timed if _state(s) == state]
                if not mine:
                    continue
                fig.add_trace(go.Bar(
                    name=state, orientation="h", base=[s["start"] for s in mine],
                    x=[max(s["seconds"], 0.05) for s in mine], y=[_step_name(s) for s in mine],
                    marker_color=CACHE_COLOURS[state],
                    customdata=[[s["seconds"], _mb(s.get("peak_rss_mb")), f"{s.get('waited') or 0:.1f} s"]
                                for s in mine],
                    hovertemplate="%{y}<br>%{customdata[0]:.2f} s, peak %{customdata[1]}, waited for "
                                  "memory %{customdata[2]}<extra>" + state + "</extra>"))
            fig.update_layout(barmode="overlay", xaxis_title="seconds since the build started",
                              yaxis={"autorange": "reversed", "automargin": True, "categoryorder": "array",
                                     "categoryarray": [_step_name(s) for s in timed]},
                              height=max(300, 22 * len(timed) + 120), margin={"t": 30, "l": 10})
        out.append(("Step timeline", "Each step from start to end, coloured by how its cache entry "
                    "was come by: built here, downloaded from the remote cache, or already up to date.", fig))
        peaks = [s for s in timed if s.get("peak_rss_mb")]
        if peaks:
            names = [_step_name(s) for s in peaks]
            fig = go.Figure([
                go.Bar(name="measured peak", x=names, y=[s["peak_rss_mb"] for s in peaks],
                       marker_color=CACHE_COLOURS["built"], hovertemplate="%{x}: %{y:.0f} MB<extra>measured</extra>"),
                go.Bar(name="estimate", x=names, y=[s.get("memory_estimate_mb") or 0 for s in peaks],
                       marker_color="#f58518", hovertemplate="%{x}: %{y:.0f} MB<extra>estimated</extra>")])
            fig.update_layout(barmode="group", yaxis_title="resident memory (MB)", margin={"t": 30},
                              xaxis={"automargin": True})
            out.append(("Peak memory per step", "Each step run in its own process (mlxbuild.child): its "
                        "measured peak beside the plan's estimate, which --memory-budget schedules by. "
                        "Steps run inside the build process have no measured figure of their own.", fig))
    return out


def _marker(decode, rows) -> float:
    rates = [r["decode"] for r in rows if r["decode"]]
    if not decode or not rates:
        return 14
    return 10 + 20 * decode / max(rates)


def _state(step: dict) -> str:
    if step.get("status") == "failed":
        return "failed"
    return step.get("cache") or ("hit" if step.get("status") == "up-to-date" else
                                 "built" if step.get("status") == "ran" else "not run")


def _name_steps(steps: list[dict]) -> None:
    """A chart row name per step: its kind and label, and its task name where two share them."""
    seen: dict[str, int] = {}
    for s in steps:
        name = f"{s['step']} {s.get('label') or s['task']}"
        seen[name] = seen.get(name, 0) + 1
        s["_name"] = name
    for s in steps:
        if seen[s["_name"]] > 1:
            s["_name"] += f" [{s['task']}]"


def _step_name(step: dict) -> str:
    return step["_name"]


# --------------------------------------------------------------------------- the page


def render(data: dict) -> str:
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    parts = [f"<h1>{_e(data['title'])}</h1>", f"<p class=sub>{_e(data['subtitle'])}</p>"]
    if data.get("error"):
        parts.append(f"<p class=bad>{_e(data['error'])}</p>")
    parts += ["<h2>Targets</h2>", _targets_table(data["targets"])]
    config = {"displaylogo": False, "responsive": True}
    for i, (heading, note, fig) in enumerate(_figures(data)):
        parts += [f"<h2>{_e(heading)}</h2>", f"<p class=muted>{_e(note)}</p>"]
        if fig is not None:
            parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=False, config=config,
                                     div_id=f"chart-{i}", default_height="420px")
                         .replace("<div>", "<div class=chart>", 1))
    rules = _rules_table(data["targets"])
    if rules:
        parts += ["<h2>Per-rule figures</h2>", rules]
    if data["steps"] is not None:
        parts += ["<h2>Steps and cache</h2>", _cache_summary(data["steps"], data.get("cache")),
                  _steps_table(data["steps"])]
    made = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class=muted>Made by <code>mlxbuild report</code> from {_e(data['source'])} on {made}.</p>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{_e(data['title'])}</title>"
            f"<style>{PAGE_CSS}</style><script>{get_plotlyjs()}</script></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _targets_table(rows: list[dict]) -> str:
    head = ["target", "backend", "scheme", "dtype", "status", "size", "KLD mean (p99)", "top-1 vs float",
            "perplexity (float → program)", "gate", "prefill tok/s", "decode tok/s", "max rel error"]
    body = []
    for r in rows:
        status = r["status"] or ""
        cls = "bad" if status == "failed" or r["quality_passed"] is False else "ok"
        if r["failure"]:
            status += f": {r['failure']}"
        kld = (f"{r['kld_mean']:.3g} ({r['kld_p99']:.3g})" if r["kld_mean"] is not None
               else f"not measured{': ' + r['quality_note'] if r['quality_note'] else ''}")
        ppl = f"{r['ppl_float']:.2f} → {r['ppl']:.2f} ({r['ppl_increase']:+.1%})" if r["ppl"] is not None else "—"
        gate = ", ".join(f"{k} {v:g}" for k, v in sorted(r["gate"].items()) if v is not None) or "—"
        body.append([(r["name"], ""), (r["backend"], ""), (r["scheme"], ""), (r["dtype"], ""), (status, cls),
                     (_size(r["size"]), "n"), (kld, "n"), (_pct(r["top1"]), "n"), (ppl, "n"), (gate, ""),
                     (_rate(r["prefill"]), "n"), (_rate(r["decode"]), "n"),
                     (f"{r['max_rel_error']:.2e}" if r["max_rel_error"] is not None else "—", "n")])
    return _table(head, body, "targets")


def _rules_table(rows: list[dict]) -> str:
    body = [[(r["name"], ""), (key, ""), (f["rule"], ""), (str(f["layers"]), "n"), (f["quantization"], ""),
             (f"{f['kld_mean']:.3g}", "n"), (_pct(f.get("top1")), "n")]
            for r in rows for key, f in r["rules"].items()]
    if not body:
        return ""
    return _table(["target", "rule", "selects", "layers", "quantization", "KLD mean alone", "top-1 alone"],
                  body, "rules")


def _cache_summary(steps: list[dict], totals: dict | None = None) -> str:
    counts: dict[str, int] = {}
    for s in steps:
        counts[_state(s)] = counts.get(_state(s), 0) + 1
    ran = counts.get("built", 0) + counts.get("remote", 0) + counts.get("hit", 0)
    hits = counts.get("hit", 0) + counts.get("remote", 0)
    rate = f"{hits / ran:.0%}" if ran else "—"
    words = ", ".join(f"{n} {state}" for state, n in counts.items())
    traffic = ""
    if totals and (totals.get("remote_down_bytes") or totals.get("remote_up_bytes")):
        traffic = (f" Remote cache: {_size(totals.get('remote_down_bytes'))} downloaded, "
                   f"{_size(totals.get('remote_up_bytes'))} uploaded.")
    return f"<p id=cache-summary>{len(steps)} steps: {_e(words)}; cache hit rate {rate}.{_e(traffic)}</p>"


def _steps_table(steps: list[dict]) -> str:
    body = [[(s["step"], ""), (s.get("label") or s["task"], ""), (_state(s), ""),
             (f"{s['start']:.1f}" if s.get("start") is not None else "—", "n"),
             (_secs(s.get("seconds")), "n"), (_secs(s.get("waited")) if s.get("waited") else "—", "n"),
             (_mb(s.get("peak_rss_mb")), "n"),
             (_mb(s.get("memory_estimate_mb")), "n")]
            for s in sorted(steps, key=lambda s: (s.get("start") is None, s.get("start") or 0))]
    return _table(["step", "of", "cache", "started at (s)", "took", "waited for memory", "peak RSS", "estimate"],
                  body, "steps")


def _table(head: list[str], body: list[list[tuple[str, str]]], ident: str) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td class='{c}'>{_e(v)}</td>" if c else f"<td>{_e(v)}</td>"
                                   for v, c in row) + "</tr>" for row in body)
    return f"<table id={ident}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "—"


def _rate(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) and x else "—"


def _mb(x) -> str:
    return f"{x:.0f} MB" if isinstance(x, (int, float)) else "—"


def _secs(x) -> str:
    return f"{x:.1f} s" if isinstance(x, (int, float)) else "—"


def _size(n) -> str:
    from mlxbuild.report import _size as size  # the Markdown summary's units

    return size(n) if n else "—"


# --------------------------------------------------------------------------- command


def default_output(source: Path, data: dict) -> Path:
    """Beside a build report (report.json → report.html); for a release, in the working
    directory (its version folder holds exactly what the lock names)."""
    if data["kind"] == "build":
        return Path(source).with_suffix(".html")
    return Path.cwd() / f"{data['stem']}-report.html"


def main(source: str, output: str | None = None) -> int:
    import sys

    from mlxbuild.report import write_atomic

    try:
        data = load(Path(source))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(output) if output else default_output(Path(source), data)
    try:
        write_atomic(out, render(data))
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(data['targets'])} targets)")
    return 0
