"""Output of `dsv4 parity endpoint` (common/parity/endpoint.py): the terminal/markdown tables, report.md and a PNG of
|delta logprob| per position with the top-1 flips marked (matplotlib optional, skipped with a note as in report.py)."""

from __future__ import annotations

from pathlib import Path

from dsv4.common.parity.endpoint import EndpointResult
from dsv4.common.parity.report import _fmt, _table

TEACHER_COLUMNS = ("positions", "top1", "top1_flips", "dlogprob_mean", "dlogprob_max", "topk_overlap", "kl_lb_mean",
                   "kl_lb_max")


def result_table(res: EndpointResult) -> str:
    """Summary (one row per mode) and one row per prompt."""
    bad = {v.where for v in res.violations}
    rows = []
    if res.teacher:
        cells = [str(int(res.teacher[c])) if c in ("positions", "top1_flips") else _fmt(res.teacher.get(c))
                 for c in TEACHER_COLUMNS]
        rows.append(["teacher forcing", res.api, *cells,
                     "FAIL" if "teacher forcing" in bad else "ok"])
    head = _table(["mode", "log-prob API", *TEACHER_COLUMNS, "result"], rows) if rows else ""
    per = []
    for r in res.prompts:
        n_cont = len(r.ids) - r.prompt_len
        dl = r.positions.get("dlogprob", [])
        free = ("-" if not r.free_ref else
                f"{r.free_diverge if r.free_diverge is not None else min(len(r.free_ref), len(r.free_got))}"
                f"/{len(r.free_ref)}")
        per.append([str(r.index), f"{r.prompt_len}+{n_cont}", "-" if r.first_flip is None else str(r.first_flip),
                    _fmt(max(dl)) if dl else "-", free,
                    "-" if r.free_diverge is None else str(r.prompt_len + r.free_diverge),
                    r.free_finish or "-"])
    body = _table(["prompt", "tokens (prompt+cont.)", "first top-1 flip (position)", "max abs dlogprob",
                   "greedy match", "first greedy divergence (position)", "endpoint finish"], per)
    free = ""
    if res.free:
        free = (f"free-running greedy: worst prompt matched {_fmt(res.free['greedy_match_frac'])} of its continuation "
                f"(mean {_fmt(res.free['greedy_match_mean'])}){' FAIL' if 'free-running greedy' in bad else ''}")
    return "\n".join(x for x in (head, body, free) if x)


def plot_positions(path: Path, res: EndpointResult) -> str | None:
    """|delta logprob| per scored position, one line per prompt, top-1 flips as red crosses, the continuation's start
    as a dotted line. Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib not importable ({type(e).__name__}: {e}); pip install 'dsv4[plot]'"
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in res.prompts:
        dl = r.positions.get("dlogprob")
        if not dl:
            continue
        xs = list(range(1, len(dl) + 1))
        ys = [max(d, 1e-12) for d in dl]  # a log axis cannot show exact zeros
        (line,) = ax.plot(xs, ys, marker=".", lw=1, label=f"prompt {r.index}")
        flips = [(x, y) for x, y, ok in zip(xs, ys, r.positions["top1"], strict=True) if not ok]
        if flips:
            ax.scatter(*zip(*flips, strict=True), marker="x", color="red", s=40, zorder=3)
        ax.axvline(r.prompt_len - 0.5, color=line.get_color(), ls=":", lw=0.8)
    ax.scatter([], [], marker="x", color="red", label="top-1 flip")
    ax.set_yscale("log")
    ax.set_xlabel("position (dotted: continuation starts)")
    ax.set_ylabel("|logprob_ref - logprob_endpoint| of the scored token")
    ax.set_title(f"{res.served_model} at {res.url} vs reference")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_endpoint_report(out_dir: str | Path, res: EndpointResult) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kl_note = ("KL is a LOWER BOUND: the endpoint returned only the top-{k} log-probs per position, so every other "
               "token is merged into one bucket (coarse-graining never increases KL)." if res.kl_is_lower_bound
               else "KL is exact: the endpoint returned every token's log-prob.").format(k=res.top_k)
    md = [f"# dsv4 parity endpoint: {res.served_model} at {res.url}", "",
          f"- reference: {res.reference}",
          f"- log-prob API: {res.api}" + (f" (rejected: {'; '.join(res.api_probe)})" if res.api_probe else ""),
          f"- tokenizer: {res.tokenizer_check}",
          f"- profile: {res.profile}; top-k {res.top_k}", f"- {kl_note}", "",
          "## Results", "", result_table(res), "", "## Violations", ""]
    md += [f"- {v}" for v in res.violations] or ["none"]
    md += [""]
    if any(r.positions for r in res.prompts):
        note = plot_positions(out / "delta_logprob.png", res)
        md += ["## |delta logprob| per position", "", note or "![delta logprob](delta_logprob.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
