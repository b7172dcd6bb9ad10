"""report: one self-contained HTML page per day, plus an index across days.

Reads the small result tables (vm_eval, fm_snapshots, fm_pointer, dq_results), never traffic:
per VM the next-day NE / AUC / calibration of every method and the FM, the NE gain over the
`none` baseline, plots of NE and FM staleness over the days, the FM snapshots with their
blessing, and the data-quality results with links to the Data Docs. Plots are inline SVG, so
the page opens from disk or any static host without network access.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import os
from pathlib import Path

from jobs import freshness, publishing
from jobs.config import ExfmConfig, parse_ds
from jobs.evaluate import FM_MERGED, FM_METHOD
from jobs.lakehouse import DQ_RESULTS, VM_EVAL, table_version

METRICS = ("n", "ne", "auc", "logloss", "calibration", "oracle_ne", "fm_staleness_days")

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.fail { color: #b00020; font-weight: bold; } .ok { color: #1b5e20; }
figure { display: inline-block; margin: 0 1em 1em 0; }
.alarm { background: #fdecea; border: 2px solid #b00020; color: #5f0010; padding: .8em 1em; margin: 1em 0; }
"""


def reports_dir(cfg: ExfmConfig) -> Path:
    return Path(cfg.table("reports"))


def run(ds: str | dt.date, cfg: ExfmConfig, spark) -> dict:
    """Write reports/ds=<ds>.html and refresh reports/index.html; returns their paths."""
    from pyspark.sql import functions as F

    day = parse_ds(ds)
    evals = []
    if table_version(cfg, VM_EVAL) is not None:  # small: (VMs x methods) rows per day
        df = spark.read.format("delta").load(cfg.table(VM_EVAL)).where(F.col("ds") <= day.isoformat())
        evals = sorted((r.asDict() for r in df.collect()), key=lambda r: (r["ds"], r["vm"], r["method"]))
    dq = []
    if table_version(cfg, DQ_RESULTS) is not None:
        dq = [r.asDict() for r in spark.read.format("delta").load(cfg.table(DQ_RESULTS)).collect()]
        dq = sorted((r for r in dq if str(r.get("ds")) == day.isoformat()), key=lambda r: str(r.get("table")))
    snaps = publishing.list_snapshots(cfg, spark)
    pointer = publishing.read_pointer(cfg, spark)
    try:
        das_snapshot = publishing.resolve_for_day(day, cfg, spark).snapshot_id
    except (publishing.NoSnapshotError, publishing.LeakageError):
        das_snapshot = None
    try:
        freshness.run(day, cfg, spark)
        alarm = None
    except freshness.StaleTeacherError as e:  # the same words as the DAG's alarm, as a banner
        alarm = str(e)

    out_dir = reports_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / f"ds={day.isoformat()}.html"
    body = render_day(day, cfg, evals, snaps, pointer, das_snapshot, dq, out_dir, alarm=alarm)
    write_atomic(page, body)
    index = out_dir / "index.html"
    write_atomic(index, render_index(out_dir, evals))
    today = [r for r in evals if r["ds"] == day.isoformat()]
    return {"ds": day.isoformat(), "report": str(page), "index": str(index), "eval_rows": len(today)}


def docs_link(cfg: ExfmConfig, out_dir: Path) -> str | None:
    """Relative link from the reports to the GX Data Docs site, if it was built."""
    index = Path(cfg.docs_root) / "index.html"
    return os.path.relpath(index, out_dir) if index.exists() else None


def ne_gains(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(vm, method) -> NE gain in % over the same VM's `none` row of the same day."""
    from models.metrics import ne_gain_pct

    base = {r["vm"]: r["ne"] for r in rows if r["method"] == "none"}
    return {(r["vm"], r["method"]): ne_gain_pct(r["ne"], base[r["vm"]]) for r in rows if r["vm"] in base}


def gain_history(history: list[dict]) -> list[dict]:
    """One row per (day, method but none) of one VM with its NE gain over that day's `none`."""
    out = []
    for ds in sorted({r["ds"] for r in history}):
        gains = ne_gains([r for r in history if r["ds"] == ds])
        out += [{"ds": ds, "method": m, "ne_gain_pct": g} for (_, m), g in gains.items() if m != "none"]
    return out


def render_day(
    day, cfg, evals, snaps, pointer, das_snapshot, dq, out_dir: Path, alarm: str | None = None
) -> str:
    docs = docs_link(cfg, out_dir)
    today = [r for r in evals if r["ds"] == day.isoformat()]
    gains = ne_gains(today)
    parts = [
        f"<h1>ExFM daily report — ds={day.isoformat()}</h1>",
        *([f"<div class='alarm' role='alert'><b>Alarm:</b> {_e(alarm)}</div>"] if alarm else []),
        f"<p>DAS teacher: <code>{_e(das_snapshot or 'none (no FM trained before this day)')}</code>"
        f" · pointer <code>{_e(cfg.das.pointer)}</code>: <code>{_e(pointer.snapshot_id if pointer else '-')}"
        f"</code> · <a href='index.html'>all days</a></p>",
        "<h2>Next-day evaluation</h2>",
    ]
    if not today:
        parts.append("<p>No models trained on the previous day: nothing to evaluate yet.</p>")
    for vm in cfg.vms:
        rows = [r for r in today if r["vm"] == vm.name]
        history = [r for r in evals if r["vm"] == vm.name]
        if not rows and not history:
            continue
        parts.append(f"<h3 id='vm-{_e(vm.name)}'>VM {_e(vm.name)} ({_e(vm.model)})</h3>")
        if rows:
            head = "".join(f"<th>{m}</th>" for m in METRICS)
            trs = []
            for r in rows:
                gain = gains.get((vm.name, r["method"]))
                cells = "".join(f"<td>{_fmt(r[m])}</td>" for m in METRICS)
                trs.append(
                    f"<tr><td class='l'>{_e(r['method'])}</td>{cells}"
                    f"<td>{'' if gain is None or r['method'] == 'none' else f'{gain:+.2f}%'}</td></tr>"
                )
            parts.append(
                f"<table class='eval'><tr><th class='l'>method</th>{head}<th>NE gain vs none</th></tr>"
                + "".join(trs)
                + "</table>"
            )
        parts.append(figure(_plot(history, "ne", f"{vm.name}: next-day NE by method"), "NE over days"))
        # The paper's Fig 5, live: what the FM is worth to this VM day after day, and the
        # teacher's own quality on the VM's rows next to it.
        parts.append(
            figure(
                _plot(gain_history(history), "ne_gain_pct", f"{vm.name}: NE gain over none (%)"),
                "The FM's value: NE gain over none by day",
            )
        )
        teacher = [r for r in history if r["method"] == FM_METHOD]
        if teacher:
            parts.append(
                figure(
                    _plot(teacher, "calibration", f"{vm.name}: teacher calibration"), "Teacher calibration"
                )
            )
        parts.append(
            figure(_plot(history, "fm_staleness_days", f"{vm.name}: FM staleness (days)"), "FM staleness")
        )

    merged = [r for r in evals if r["method"] == FM_MERGED]
    if merged:  # the FM's own next-day quality, on the FM dataset (every VM's requests, merged)
        parts.append(f"<h3 id='fm-merged'>FM on its own data ({FM_MERGED}: fm_dataset)</h3>")
        for r in (r for r in merged if r["ds"] == day.isoformat()):
            head = "".join(f"<th>{m}</th>" for m in METRICS)
            cells = "".join(f"<td>{_fmt(r[m])}</td>" for m in METRICS)
            parts.append(f"<table class='eval'><tr>{head}</tr><tr>{cells}</tr></table>")
        parts.append(figure(_plot(merged, "ne", "FM: next-day NE on fm_dataset"), "FM NE over days"))

    parts.append("<h2>FM snapshots</h2><table class='snapshots'><tr>")
    parts.append(
        "".join(
            f"<th class='l'>{h}</th>"
            for h in ("snapshot", "trained through", "status", "holdout NE", "ref NE")
        )
        + "</tr>"
    )
    for s in snaps:
        mark = " (pointer)" if pointer and s.snapshot_id == pointer.snapshot_id else ""
        parts.append(
            f"<tr><td class='l'>{_e(s.snapshot_id)}{mark}</td><td class='l'>{s.trained_through_ds}</td>"
            f"<td class='l {'fail' if s.status == publishing.REJECTED else 'ok'}'>{s.status}</td>"
            f"<td>{_fmt(s.holdout_ne)}</td><td>{_fmt(s.reference_ne)}</td></tr>"
        )
    parts.append("</table>")

    parts.append("<h2>Data quality</h2>")
    parts.append(f"<p><a href='{_e(docs)}'>Data Docs</a></p>" if docs else "<p>No Data Docs built yet.</p>")
    if dq:
        parts.append(
            "<table class='dq'><tr><th class='l'>table</th><th class='l'>suite</th><th>result</th></tr>"
        )
        for r in dq:
            ok = bool(r.get("success"))
            suite = _e(r.get("suite"))
            page = (r.get("data_docs") or "").removeprefix("file://")
            if page:  # the validation's own page: static, readable offline too
                href = page if "://" in page else os.path.relpath(page, out_dir)
                suite = f"<a href='{_e(href)}'>{suite}</a>"
            parts.append(
                f"<tr><td class='l'>{_e(r.get('table'))}</td><td class='l'>{suite}</td>"
                f"<td class='{'ok' if ok else 'fail'}'>{'passed' if ok else 'FAILED'}</td></tr>"
            )
        parts.append("</table>")
    return html_page(f"ExFM report {day.isoformat()}", "\n".join(parts))


def render_index(out_dir: Path, evals: list[dict]) -> str:
    """Every day's report, newest first, with the production method's mean NE gain over `none`."""
    by_day: dict[str, list[dict]] = {}
    for r in evals:
        by_day.setdefault(r["ds"], []).append(r)
    rows = []
    for page in sorted(out_dir.glob("ds=*.html"), reverse=True):
        ds = page.stem[3:]
        gains = ne_gains(by_day.get(ds, []))
        best = {}
        for (_, method), g in gains.items():
            if method not in ("none", FM_METHOD):
                best.setdefault(method, []).append(g)
        summary = ", ".join(f"{m}: {sum(g) / len(g):+.2f}%" for m, g in sorted(best.items())) or "-"
        rows.append(
            f"<tr><td class='l'><a href='{_e(page.name)}'>{ds}</a></td><td class='l'>{summary}</td></tr>"
        )
    table = "<table><tr><th class='l'>day</th><th class='l'>mean NE gain vs none</th></tr>" + "".join(rows)
    return html_page("ExFM reports", "<h1>ExFM daily reports</h1>" + table + "</table>")


def _plot(rows: list[dict], metric: str, title: str) -> str:
    """An inline SVG line chart of ``metric`` over days, one line per method."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe inside Airflow workers
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for method in sorted({r["method"] for r in rows}):
        points = [(dt.date.fromisoformat(r["ds"]), r[metric]) for r in rows if r["method"] == method]
        points = [(d, v) for d, v in points if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    days = sorted({dt.date.fromisoformat(r["ds"]) for r in rows})
    if days:  # whole days on the axis, with a margin so one day is not stretched over years
        ax.set_xlim(days[0] - dt.timedelta(days=1), days[-1] + dt.timedelta(days=1))
        ax.xaxis.set_major_locator(mdates.DayLocator(interval=max(1, len(days) // 8)))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return svg(fig)


def svg(fig) -> str:
    """A matplotlib figure as inline SVG (closed after)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG sits inside HTML


def figure(svg_text: str, caption: str) -> str:
    return f"<figure class='plot'>{svg_text}<figcaption>{_e(caption)}</figcaption></figure>"


def html_page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return _e(value)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def write_atomic(path: Path, text: str) -> None:
    """Readers (a browser, a static host) never see half a page."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
