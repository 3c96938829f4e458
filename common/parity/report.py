"""Tables and the markdown report of the parity suite (common/parity.py), with a PNG plot of error growth across
layers when matplotlib is importable (it is optional: `pip install 'dsv4[plot]'`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from dsv4.common.parity.bisect import BisectResult
from dsv4.common.parity.compare import Comparison

LOGIT_COLUMNS = ("cosine", "max_abs", "max_abs_norm", "kl", "kl_max", "top1", "topk", "thousandth")


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if v == 0:
        return "0"
    if 0.999 < v < 1 - 1e-12:  # cosines and agreement fractions: "1-2.3e-08" says more than a rounded "1"
        return f"1-{1 - v:.1e}"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:.6f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:.3f}"
    return f"{v:.2e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (also readable in a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def comparison_table(comps: Sequence[Comparison]) -> str:
    """One row per (pair, profile, phase): logits metrics, greedy match for decode, worst layer, verdict."""
    header = ["reference", "candidate", "profile", "phase", *LOGIT_COLUMNS, "greedy", "worst layer cos", "result"]
    rows = []
    for c in comps:
        worst = min((m.get("cosine", math.nan) for m in c.layers), default=None)
        for phase, m in (("prefill", c.prefill), ("decode", c.decode)):
            if not m:
                continue
            bad = [v for v in c.violations if v.where.startswith(phase)]
            greedy = (f"{int(m['greedy_match_min'])}/{round(m['greedy_match_min'] / m['greedy_match_frac'])}"
                      if m.get("greedy_match_frac") else ("0" if "greedy_match_min" in m else "-"))
            rows.append([c.ref, c.got, c.profile, phase, *(_fmt(m.get(k)) for k in LOGIT_COLUMNS), greedy,
                         _fmt(worst) if phase == "prefill" else "", "FAIL" if bad else "ok"])
        hidden_bad = [v for v in c.violations if "hidden" in v.where]
        if hidden_bad:
            rows.append([c.ref, c.got, c.profile, "hidden", *([""] * len(LOGIT_COLUMNS)), "", "",
                         f"FAIL ({hidden_bad[0].where})"])
    return _table(header, rows)


def bisect_table(res: BisectResult, only_failures: bool = True) -> str:
    """Per-op rows: isolated (replayed inputs) and accumulated (free runs) error side by side."""
    acc = {r.name: r for r in res.accumulated}
    rows = []
    for r in res.replay:
        if only_failures and not r.violations and r.name != res.first_op:
            continue
        a = acc.get(r.name)
        rows.append([r.name, _fmt(r.metrics.get("cosine")), _fmt(r.metrics.get("max_abs_norm")),
                     _fmt(r.metrics.get("index_mismatch")), _fmt(a.metrics.get("cosine") if a else None),
                     _fmt(a.metrics.get("max_abs_norm") if a else None), "FAIL" if r.violations else "ok"])
    if not rows:
        return f"bisect {res.backend_a} vs {res.backend_b} ({res.profile}): all {len(res.replay)} ops within bounds"
    return _table(["op", "isolated cos", "isolated max_abs_norm", "index mismatch", "accumulated cos",
                   "accumulated max_abs_norm", "result"], rows)


def layer_table(res: BisectResult) -> str:
    rows = [[r.name, _fmt(r.metrics.get("cosine")), _fmt(r.metrics.get("max_abs_norm")),
             _fmt(r.metrics.get("mean_abs")), "FAIL" if r.violations else "ok"] for r in res.layers]
    return _table(["layer", "cosine", "max_abs_norm", "mean_abs", "result"], rows)


def plot_error_growth(path: Path, series: dict[str, list[float]], ylabel: str) -> str | None:
    """Log-scale line plot of a per-layer error for each series; returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: reports are written on servers without a display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except Exception as e:
        return f"plot skipped: matplotlib not importable ({type(e).__name__}: {e}); pip install 'dsv4[plot]'"
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in series.items():
        # a log axis cannot show exact zeros: draw them at the fp64 floor so a perfect layer stays visible
        ax.plot(range(len(ys)), [max(y, 1e-16) for y in ys], marker="o", label=label)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title("error growth across layers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(out_dir: str | Path, comps: Sequence[Comparison], bisects: Sequence[BisectResult] = (),
                 title: str = "dsv4 parity report") -> Path:
    """Write out_dir/report.md (tables, violations) and out_dir/error_growth.png (1 - cosine of the hidden streams
    per layer). Returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    series: dict[str, list[float]] = {}
    if comps:
        md += ["## Logits", "", comparison_table(comps), ""]
        bad = [(c, v) for c in comps for v in c.violations]
        md += ["## Violations", ""] + ([f"- {c.ref} vs {c.got} [{c.profile}] {v}" for c, v in bad] or ["none"])
        md.append("")
        for c in comps:
            if c.layers:
                series[f"{c.ref} vs {c.got} [{c.profile}]"] = [1.0 - m.get("cosine", math.nan) for m in c.layers]
    for res in bisects:
        md += [f"## Bisect: {res.backend_a} vs {res.backend_b} [{res.profile}]", "", "```", res.summary(), "```", "",
               "### Per layer (free runs)", "", layer_table(res), "", "### Ops beyond tolerance (isolated = same "
               "inputs as A; accumulated = free runs)", "", bisect_table(res), ""]
        series[f"bisect {res.backend_a} vs {res.backend_b} [{res.profile}]"] = [
            1.0 - r.metrics.get("cosine", math.nan) for r in res.layers]
    if series:
        note = plot_error_growth(out / "error_growth.png", series, "1 - cosine of the hidden streams")
        md += ["## Error growth across layers", "", note or "![error growth](error_growth.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
