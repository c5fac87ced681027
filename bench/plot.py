"""Turn a benchmark summary JSON (bench/results/<device>[-archs|-quick]-summary.json) into a PNG:
one small panel per workload, each with the engine's same-run speed-up over every baseline
(baseline time / engine time) as horizontal bars growing from 1x on a log axis, the ratio printed
at each bar end, one colour per baseline in every panel and one legend below the panels.

    python bench/plot.py bench/results/cpu-amd-epyc-summary.json [-o chart.png]
    python bench/plot.py SUMMARY.json --dense     # the extrapolated dense-step ratios instead
    python bench/plot.py SUMMARY.json --kernels   # the fused kernels against the reference kernels

All summaries written by bench/conftest.py have this shape (the architecture runs, ``-k archs``,
included): ``workloads`` maps a workload to its ``methods`` and ``engine`` ratios, ``kernels`` maps
a kernel case to its backends. A summary without workload ratios (a ``--quick`` run of only
bench/test_kernels.py, for example) is drawn from its ``kernels`` table. Anything else stops with
a message saying what is missing; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import textwrap

# Okabe-Ito (colour-blind safe). Known baselines keep their colour in every figure.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#999999", "#F0E442"]
KNOWN = ["reference", "no_reuse", "vmap", "fo", "loop"]
DESCRIBE = {
    "reference": "reference (paper's per-block loop)",
    "no_reuse": "no_reuse (same loop from the input)",
    "vmap": "vmap (torch.func over perturbed copies)",
    "fo": "fo (one forward + backward)",
    "loop": "loop (RGE, one direction at a time)",
    "kernels": "reference kernel backend (chain of torch ops)",
}
NCOLS = 4
PANEL_W = 3.9   # inches per panel column
SLOT_H = 0.2    # inches per bar slot
FONT = 8.5      # tick labels, value labels, subtitles: >= 8 pt at the saved size
DPI = 130


class SummaryError(ValueError):
    """The file is not a summary this script can draw."""


# ----------------------------------------------------------------------------- reading
def load_summary(path: str) -> dict:
    try:
        with open(path) as f:
            s = json.load(f)
    except json.JSONDecodeError as e:
        raise SummaryError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(s, dict):
        raise SummaryError(f"{path}: expected a JSON object (a benchmark summary), got {type(s).__name__}")
    for key in ("workloads", "kernels"):
        if not isinstance(s.get(key, {}), dict):
            raise SummaryError(f"{path}: '{key}' should map names to results, got {type(s[key]).__name__}")
    if not s.get("workloads") and not s.get("kernels"):
        raise SummaryError(f"{path}: not a benchmark summary (no 'workloads' and no 'kernels' table); "
                           "write one with `pytest bench/ --benchmark-only`")
    return s


def _ratios(d) -> dict:
    """Positive finite ratios only (a missing or failed timing is left out, not drawn as 0)."""
    if not isinstance(d, dict):
        return {}
    return {b: float(v) for b, v in d.items()
            if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)}


def _si(v: float, unit: str = "") -> str:
    """5113.2 -> 5.11k; with a unit, 3.9e10 B/s -> 39 GB/s."""
    sep = " " if unit else ""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{sep}{prefix}{unit}"
    return f"{v:.3g}{sep}{unit}"


def _short(engine: str) -> str:
    """engine-native-budget=16777216 -> native budget=16 MiB."""
    name = engine[len("engine-"):] if engine.startswith("engine-") else engine
    parts = name.split("-")
    for i, p in enumerate(parts):
        key, _, val = p.partition("=")
        if key == "budget" and val.isdigit() and int(val) % 2 ** 20 == 0:
            parts[i] = f"budget={int(val) // 2 ** 20} MiB"
    return " ".join(parts)


def _describe(name: str, wl: dict) -> str:
    bits = [str(wl["model"])] if wl.get("model") else []
    if wl.get("batch"):
        bits.append(f"batch {wl['batch']}")
    if isinstance(wl.get("parameters"), (int, float)):
        bits.append(f"{wl['parameters'] / 1e6:.2f} M params")
    c, dense = wl.get("coords"), wl.get("dense_coords")
    if c and name.startswith("rge"):
        bits.append(f"q = {c} directions")
    elif c:
        bits.append(f"{c:,} of {dense:,} coords" if wl.get("sampled") and dense else f"{c:,} coords")
    return ", ".join(b.replace(" ", "\u00a0") for b in bits)  # wrapped between the parts only


def _throughput(engines: dict) -> str:
    rates = [(e, r["pert_per_s"]) for e, r in engines.items()
             if isinstance(r, dict) and isinstance(r.get("pert_per_s"), (int, float))]
    if not rates:
        return ""
    if len(rates) <= 3:
        return "engine pert/s: " + ", ".join(f"{_short(e)} {_si(v)}" for e, v in rates)
    rates = [(_short(e).replace(" ", "\u00a0"), v) for e, v in rates]  # wrap between names only
    lo, hi = min(rates, key=lambda t: t[1]), max(rates, key=lambda t: t[1])
    return f"engine pert/s: {_si(lo[1])} ({lo[0]}) \u2013 {_si(hi[1])} ({hi[0]})"


def workload_panels(s: dict, dense: bool = False) -> list:
    """One panel per workload with engine ratios: {title, subtitle, rows: [(engine, {baseline: x})]}."""
    key = "dense_speedup_vs" if dense else "speedup_vs"
    panels = []
    for name, wl in s.get("workloads", {}).items():
        engines = wl.get("engine") if isinstance(wl, dict) else None
        if not isinstance(engines, dict):
            continue
        rows = [(_short(e), _ratios(r.get(key))) for e, r in engines.items() if isinstance(r, dict)]
        rows = [(e, d) for e, d in rows if d]
        if rows:
            sub = [_throughput(engines), _describe(name, wl)]
            panels.append({"title": name, "subtitle": [t for t in sub if t], "rows": rows})
    return panels


def kernel_panels(s: dict) -> list:
    """One panel per kernel case: each backend against the reference backend of the same run
    (named ``reference``; ``torch`` in summaries written before the backend was renamed)."""
    panels = []
    for case, rows in s.get("kernels", {}).items():
        if not isinstance(rows, dict):
            continue
        ref = next((b for b in ("reference", "torch") if b in rows), None)
        t_ref = (rows.get(ref) or {}).get("time_s") if ref else None
        out, sub = [], []
        for b, r in rows.items():
            t = r.get("time_s") if isinstance(r, dict) else None
            if b == ref or not t_ref or not isinstance(t, (int, float)) or t <= 0:
                continue
            out.append((b, _ratios({"kernels": t_ref / t})))
            if r.get("gbytes_per_s"):
                sub.append(f"{b} {_si(r['gbytes_per_s'] * 1e9, 'B/s')}")
        first = next(iter(rows.values()), {})
        head = f"{first.get('kernel', '')}, K={first.get('k')}" if isinstance(first, dict) else ""
        if out:
            panels.append({"title": case, "subtitle": [t for t in (head, ", ".join(sub)) if t],
                           "rows": [(b, d) for b, d in out if d]})
    return panels


# ----------------------------------------------------------------------------- drawing
def _fmt_ratio(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}\u00d7"
    if v >= 1:
        return f"{v:.3g}\u00d7"
    digits = max(2, 1 - math.floor(math.log10(v)))  # two significant digits, never 1e-05
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") + "\u00d7"


def _baselines(panels: list) -> list:
    seen = []
    for p in panels:
        for _, d in p["rows"]:
            seen += [b for b in d if b not in seen]
    return sorted(seen, key=lambda b: (KNOWN.index(b) if b in KNOWN else len(KNOWN), seen.index(b)))


def _colours(bases: list) -> dict:
    spare = iter(c for i, c in enumerate(OKABE_ITO) if i >= len(KNOWN))
    out = {}
    for b in bases:
        out[b] = OKABE_ITO[KNOWN.index(b)] if b in KNOWN else next(spare, "#444444")
    return out


def _slots(rows: list) -> tuple:
    """y positions: bars of one engine adjacent, a gap between engines (smaller when each engine
    has one bar). Returns (bars, ticks, slots used)."""
    gap = 0.6 if any(len(d) > 1 for _, d in rows) else 0.25
    y, bars, ticks = 0.0, [], []
    for label, d in rows:
        first = y
        for b, v in d.items():
            bars.append((y, b, v))
            y += 1
        ticks.append(((first + y - 1) / 2, label))
        y += gap
    return bars, ticks, y - gap


def _xlimits(panels: list, width_in: float) -> tuple:
    vals = [v for p in panels for _, d in p["rows"] for v in d.values()]
    lo, hi = math.log10(min(vals + [1.0])), math.log10(max(vals + [1.0]))
    lo, hi = min(lo, -0.3), max(hi, 0.3)

    def room(side):  # the longest value label on that side, as a fraction of the axis width
        n = max([len(_fmt_ratio(v)) for v in vals if (v >= 1) == (side == "right")], default=0)
        return (0.075 * n + 0.1) / width_in

    fl, fr = room("left"), room("right")
    span = (hi - lo) / (1 - fl - fr)
    return 10 ** (lo - fl * span), 10 ** (hi + fr * span)


def _xticks(xlim: tuple) -> list:
    """Powers of ten inside the limits, at most five of them (1x always); 2x and 5x steps too when
    the range is narrower than three decades."""
    lo, hi = math.ceil(math.log10(xlim[0])), math.floor(math.log10(xlim[1]))
    step = max(1, math.ceil((hi - lo + 1) / 5))
    ticks = [10.0 ** e for e in range(lo, hi + 1) if e % step == 0]
    if len(ticks) < 3:
        ticks = sorted(m * 10.0 ** e for e in range(lo - 1, hi + 1) for m in (1, 2, 5))
        ticks = [round(t, 6) for t in ticks if xlim[0] <= t <= xlim[1]]
    return ticks


def _style_axes(ax, ticks: list, xlim: tuple, slots: float):
    from matplotlib.ticker import FixedLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_xlim(*xlim)
    ax.set_ylim(slots - 0.7, -0.7)  # top-aligned, same slot height in every panel of the figure
    ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=FONT)
    ax.tick_params(axis="y", length=0)
    xt = _xticks(xlim)
    ax.set_xticks(xt, [(f"{v:g}" if 0.01 <= v <= 1000 else f"$10^{{{round(math.log10(v))}}}$") + "\u00d7"
                       for v in xt], fontsize=FONT)
    lo, hi = math.floor(math.log10(xlim[0])), math.ceil(math.log10(xlim[1]))
    decades = [10.0 ** e for e in range(lo, hi + 1)]
    ax.xaxis.set_minor_locator(FixedLocator([d for d in decades if d not in xt]))  # unlabelled decades
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="x", which="minor", color="0.93", lw=0.8)
    ax.axvline(1.0, color="black", lw=1.0, zorder=3)
    ax.grid(axis="x", which="major", color="0.85", lw=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def draw_panel(ax, panel: dict, colours: dict, xlim: tuple, slots: float, sub_lines: int):
    bars, ticks, _ = _slots(panel["rows"])
    for y, b, v in bars:
        ax.barh(y, v - 1.0, left=1.0, height=0.8, color=colours[b], edgecolor="none")
        right = v >= 1
        ax.text(v * (1.07 if right else 1 / 1.07), y, _fmt_ratio(v), va="center",
                ha="left" if right else "right", fontsize=FONT)
    _style_axes(ax, ticks, xlim, slots)
    # title and subtitle hang from the same height in every panel of a grid row
    top = 4 + 11.5 * sub_lines
    ax.annotate(_subtitle(panel), xy=(0, 1), xycoords="axes fraction", xytext=(0, top),
                textcoords="offset points", va="top", ha="left", fontsize=FONT, color="0.3")
    ax.annotate(textwrap.fill(panel["title"], 36), xy=(0, 1), xycoords="axes fraction",
                xytext=(0, top + 3), textcoords="offset points", va="bottom", ha="left",
                fontsize=10.5, fontweight="bold")


def _subtitle(panel: dict) -> str:
    return "\n".join(textwrap.fill(t, 52) for t in panel["subtitle"])


def _order(panels: list) -> list:
    """Panels with many bars first (summary order kept within each half), so that a grid row
    does not pair one tall panel with three nearly empty ones."""
    n = [sum(len(d) for _, d in p["rows"]) for p in panels]
    return [p for _, p in sorted(enumerate(panels), key=lambda t: n[t[0]] <= max(n) / 2)]


def make_figure(s: dict, panels: list, what: str):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = _order(panels)
    ncols = min(NCOLS, len(panels))
    nrows = -(-len(panels) // ncols)
    slots = [max(2.2, max(_slots(p["rows"])[2] for p in panels[r * ncols:(r + 1) * ncols]) + 0.4)
             for r in range(nrows)]
    fig = plt.figure(figsize=(PANEL_W * ncols, SLOT_H * sum(slots) + 1.2 * nrows + 1.5),
                     layout="constrained")
    gs = fig.add_gridspec(nrows, ncols, height_ratios=slots)
    bases = _baselines(panels)
    colours = _colours(bases)
    xlim = _xlimits(panels, PANEL_W - 1.5)
    lines = [max(_subtitle(p).count("\n") + 1 for p in panels[r * ncols:(r + 1) * ncols])
             for r in range(nrows)]
    for i, p in enumerate(panels):
        r = i // ncols
        draw_panel(fig.add_subplot(gs[r, i % ncols]), p, colours, xlim, slots[r], lines[r])
    handles = [Patch(color=colours[b], label=DESCRIBE.get(b, b)) for b in bases]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(bases), 3), fontsize=9.5,
               title=("" if what == "kernels" else "engine ") + "speed-up over:", title_fontsize=9.5,
               frameon=False)
    fig.suptitle(_headline(s, what), fontsize=11.5)
    return fig


def _headline(s: dict, what: str) -> str:
    ratio = "engine speed-up over each baseline (baseline time \u00f7 engine time)"
    head = {"workloads": ratio.replace(" (", ", same run ("),
            "dense": "extrapolated dense step: " + ratio,
            "kernels": "fused kernels: speed-up over the reference kernel backend, same run"}[what]
    meta = [s.get("device"), f"{s['mode']} mode" if s.get("mode") else None,
            f"torch {s['torch']}" if s.get("torch") else None,
            f"{s['threads']} threads" if s.get("threads") else None,
            str(s["date_utc"])[:10] if s.get("date_utc") else None]
    return (f"{head}\n" + ", ".join(str(m) for m in meta if m)
            + f". Bars grow from 1\u00d7: right = {'kernel' if what == 'kernels' else 'engine'} faster, "
            "left = slower (log axis).")


# ----------------------------------------------------------------------------- CLI
def save_atomic(fig, out: str):
    """Write to a temporary file beside ``out`` and rename it over ``out``: a reader never sees
    half a PNG, and a failed draw leaves the previous chart in place."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def choose_panels(s: dict, path: str, dense: bool, kernels: bool) -> tuple:
    if kernels:
        panels, what = kernel_panels(s), "kernels"
    else:
        panels, what = workload_panels(s, dense), "dense" if dense else "workloads"
        if not panels and not dense and not any(isinstance(w, dict) and w.get("engine")
                                                for w in s.get("workloads", {}).values()):
            panels, what = kernel_panels(s), "kernels"
    if not panels:
        wanted = {"kernels": "kernel speed-ups ('kernels' with a reference backend and timings)",
                  "dense": "extrapolated dense ratios ('dense_speedup_vs' of a workload's engine)",
                  "workloads": "engine ratios ('speedup_vs' of a workload's engine)"}[what]
        raise SummaryError(f"{path}: nothing to plot: no {wanted}")
    return panels, what


def main(argv=None):
    ap = argparse.ArgumentParser(description="Draw a benchmark summary JSON as a PNG: one panel per "
                                 "workload, the engine's same-run speed-up over each baseline.")
    ap.add_argument("summary")
    ap.add_argument("-o", "--output", default=None, help="PNG path (default: next to the JSON)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--dense", action="store_true",
                   help="plot the extrapolated dense-step ratios of the sampled workloads")
    g.add_argument("--kernels", action="store_true",
                   help="plot the fused kernels against the reference kernel backend")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        s = load_summary(a.summary)
        try:
            panels, what = choose_panels(s, a.summary, a.dense, a.kernels)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            if isinstance(e, SummaryError):
                raise
            raise SummaryError(f"{a.summary}: unexpected summary structure ({e!r})") from e
    except (OSError, SummaryError) as e:
        raise SystemExit(f"bench/plot.py: {e}")
    out = a.output or os.path.splitext(a.summary)[0] + ("-dense" if a.dense else "") + (
        "-kernels" if a.kernels else "") + ".png"
    fig = make_figure(s, panels, what)
    try:
        save_atomic(fig, out)
    finally:
        plt.close(fig)
    print(out)
    return out


if __name__ == "__main__":
    main()
