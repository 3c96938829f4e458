"""Parity suite: the `dsv4 parity` subcommands (run, record, compare, bisect) for common/cli.py. The core is
common/parity.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dsv4.common.model.ops import Ops
from dsv4.common.parity.bisect import bisect
from dsv4.common.parity.compare import (
    BackendRun,
    Comparison,
    NonFiniteError,
    Tolerances,
    assert_finite,
    compare_runs,
    default_prompts,
    dtype_name,
    parse_dtype,
    run_backend,
)
from dsv4.common.parity.golden import GoldenError, compare_golden, load_golden, record_golden
from dsv4.common.parity.sources import (
    ModelSource,
    available_backends,
    checkpoint_fingerprint,
    default_model_source,
    make_backend,
)
from dsv4.common.runtime.backend import BackendUnavailable
from dsv4.common.runtime.guards import NonFiniteLogitsError, locate_nonfinite
from dsv4.common.runtime.loading import add_threads_argument


def run_matrix(source: ModelSource, backends: Sequence[tuple[str, Ops]], dtypes: Sequence[torch.dtype],
               tol: Tolerances, prompts: Tensor, decode_steps: int, log: Callable[[str], None] = print
               ) -> list[Comparison]:
    """Run every backend on the same prompts (the first is the anchor: its greedy tokens are fed to the others)
    and compare every pair, for each dtype."""
    out = []
    for dtype in dtypes:
        runs: list[BackendRun] = []
        for label, ops in backends:
            t0 = time.perf_counter()
            model = source.factory(ops, dtype)
            teacher = runs[0].decode_tokens if runs else None
            runs.append(run_backend(model, prompts, decode_steps, teacher, label=label))
            log(f"  ran {label} {dtype_name(dtype)} in {time.perf_counter() - t0:.1f}s")
            bad_rows = (~torch.isfinite(runs[-1].prefill_logits).flatten(1).all(-1)).nonzero().flatten().tolist()
            if bad_rows:  # say where the NaN/Inf came from, not only that the metrics are NaN
                where = locate_nonfinite(model, prompts[bad_rows[0]].tolist())
                log(f"  {label} {dtype_name(dtype)}: NaN/Inf prefill logits (prompt {bad_rows[0]}); first "
                    f"non-finite output: {where}")
            del model
        for i in range(len(runs)):
            for j in range(i + 1, len(runs)):
                out.append(compare_runs(runs[i], runs[j], tol))
    return out


def model_source_from_loader(ns: argparse.Namespace, load_model: Callable[[argparse.Namespace, Ops, torch.dtype],
                             nn.Module], checkpoint: str | Path | None, vocab_size: int | None = None) -> ModelSource:
    """The CLI's model loading as a ModelSource: load_model(ns, ops, dtype) for a checkpoint path (fingerprinted by
    its safetensors headers), or the embedded random model when there is no checkpoint. Pass the config's
    vocab_size to spare a model build just to size the default prompts."""
    if not checkpoint:
        return _resolve_source(ns, None)
    from dsv4.common.model.config import ModelArgs

    args = ModelArgs.load(checkpoint)  # config.json: identifies the config without loading any weights
    return ModelSource(lambda ops, dtype: load_model(ns, ops, dtype), checkpoint_fingerprint(checkpoint),
                       str(checkpoint), vocab_size or args.vocab_size, args.arch_hash())


def _vocab_size(source: ModelSource, ops: Ops) -> int:
    if source.vocab_size is None:
        model = source.factory(ops, torch.float32)  # only when the source cannot say: a full model build
        source.vocab_size = model.args.vocab_size
        del model
    return source.vocab_size


def _resolve_source(ns: argparse.Namespace, model_source: ModelSource | None) -> ModelSource:
    if model_source is not None:
        return model_source
    return default_model_source(getattr(ns, "config", "tiny") or "tiny", getattr(ns, "seed", 0),
                                getattr(ns, "kv_fp8_sim", None), getattr(ns, "weights", "dequantized"),
                                getattr(ns, "weight_init", "plain") == "structured")


def _prompts_for(ns: argparse.Namespace, vocab_size: int, tol: Tolerances, pair: str | None = None) -> Tensor:
    batch = ns.batch or int(tol.setting("batch", pair, 2))
    seq = ns.seq_len or int(tol.setting("seq_len", pair, 24))
    return default_prompts(vocab_size, batch, seq, ns.prompt_seed)


def _decode_steps(ns: argparse.Namespace, tol: Tolerances) -> int:
    return ns.decode_steps if ns.decode_steps is not None else int(tol.setting("decode_steps", None, 4))


def cmd_run(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity run`: every backend this machine can run, every pair, each dtype; table + optional report."""
    from dsv4.common.parity.report import comparison_table

    tol = Tolerances.load(ns.tolerances)
    # the default suite unless a model (checkpoint, --config, --kv-fp8-sim), backends or dtypes are chosen
    if all(getattr(ns, a, None) is None for a in ("model", "config", "kv_fp8_sim", "backends", "dtype")):
        return cmd_run_suite(ns, tol)
    ns.dtype = ns.dtype or ["fp32"]
    source = _resolve_source(ns, model_source)
    if ns.include_interpreted:
        _arrange_triton_interpreter()
    choices = available_backends(ns.device, ns.include_interpreted)
    usable = [c for c in choices if c.available]
    for c in choices:
        print(f"{'ran ' if c.available else 'skip'} {c.label}: {c.reason}")
    if ns.backends:
        unknown = set(ns.backends) - {c.label for c in choices}
        if unknown:
            raise ValueError(f"--backends: {sorted(unknown)} not among {[c.label for c in choices]}")
        usable = [c for c in usable if c.label in ns.backends]
    if len(usable) < 2:
        print("parity run: fewer than two backends can run here; nothing to compare", file=sys.stderr)
        return 2
    backends = [(c.label, c.make()) for c in usable]
    prompts = _prompts_for(ns, _vocab_size(source, backends[0][1]), tol)
    steps = _decode_steps(ns, tol)
    comps = run_matrix(source, backends, [parse_dtype(d) for d in ns.dtype], tol, prompts, steps)
    print(comparison_table(comps))
    for c in comps:
        for v in c.violations:
            print(f"VIOLATION {c.ref} vs {c.got} [{c.profile}] {v}")
    if ns.report:
        _report(ns.report, comps, title=f"dsv4 parity run: {source.label}")
    return 0 if all(c.ok for c in comps) else 1


def _arrange_triton_interpreter() -> None:
    """--include-interpreted on a machine without a CUDA GPU: Triton reads TRITON_INTERPRET when it is imported and
    when its kernels are decorated, so it must be set before either happens (toolchain fact: otherwise a launch fails
    deep inside the interpreter). Set it here, first thing; refuse when triton was already imported without it."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available():
        return
    if "triton" in sys.modules:
        raise ValueError("--include-interpreted: triton was imported in this process before TRITON_INTERPRET=1 "
                         "was set; run with TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


def _report(path: str, comps: list, **kw: Any) -> None:
    """Write the report and say where; a skipped plot (matplotlib missing) is said on the terminal too."""
    from dsv4.common.parity.report import write_report

    md = write_report(path, comps, **kw)
    print(f"report: {md}")
    note = next((line for line in md.read_text().splitlines() if line.startswith("plot skipped")), None)
    if note:
        print(f"parity: {note}", file=sys.stderr)


def cmd_run_suite(ns: argparse.Namespace, tol: Tolerances) -> int:
    """The default `dsv4 parity run` (no --config / --backends / --dtype): common/parity/suite.py's plan, which
    reaches every fused Ascend path on each emulated chip (a real NPU, when present, is not part of it: name it
    with --backends)."""
    from dsv4.common.parity.report import comparison_table
    from dsv4.common.parity.suite import default_plan, interpreted_plan, reached_lines, requantized_plan, run_case

    if ns.include_interpreted:
        _arrange_triton_interpreter()
    t0 = time.perf_counter()
    plan = default_plan(tol) + ([] if ns.skip_cost else requantized_plan(tol))
    plan += interpreted_plan(tol) if ns.include_interpreted else []
    anchors: dict = {}  # the FP8-weights anchor serves the 950 case and the cost case
    results = [run_case(c, tol, ns.allow_fallback, ns.prompt_seed, anchor_runs=anchors) for c in plan]
    comps = [c for r in results for c in r.comparisons]
    for r in results:
        print(f"\n{r.case.name}{' (reported cost, loose bounds)' if r.case.reported_only else ''}:")
        print(comparison_table(r.comparisons))
    for line in reached_lines(results):
        print(line)
    bad = 0
    for r in results:
        for c in r.comparisons:
            for v in c.violations:
                print(f"VIOLATION [{r.case.name}] {c.ref} vs {c.got} ({c.pair}, {c.profile}) {v}")
            bad += not c.ok
    if ns.report:
        _report(ns.report, comps, title="dsv4 parity run: default suite")
    print(f"parity run: {len(comps) - bad}/{len(comps)} pairs within bounds in {time.perf_counter() - t0:.0f}s")
    return 0 if bad == 0 else 1


def cmd_record(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity record --backend X --out golden.safetensors`."""
    out = Path(ns.out)  # checked before the model runs: a run is minutes on a real model
    if out.is_dir():
        raise ValueError(f"--out {ns.out}: is a directory; give the golden file's path, "
                         f"e.g. {out / 'golden.safetensors'}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {ns.out}: folder {out.parent} does not exist")
    tol = Tolerances.load(ns.tolerances)
    source = _resolve_source(ns, model_source)
    ops = make_backend(ns.backend, ns.device)
    dtype = parse_dtype(ns.dtype[0])
    model = source.factory(ops, dtype)
    prompts = _prompts_for(ns, model.args.vocab_size, tol)  # the model is built anyway: no extra cost
    steps = _decode_steps(ns, tol)
    run = run_backend(model, prompts, steps, keep_hidden=not ns.no_hidden, label=ns.backend)
    assert_finite(run.prefill_logits, f"{ns.backend} prefill logits")  # a NaN golden would judge nothing
    meta = record_golden(ns.out, run, ops, model.args.arch_hash(), source.checkpoint_hash,
                         {"model": source.label})
    print(f"recorded {ns.out}: backend {meta['backend']} on {meta['device']}, {meta['dtype']}, "
          f"config {meta['config_hash']}, checkpoint {meta['checkpoint_hash']}")
    return 0


def cmd_compare(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity compare golden.safetensors --backend Y`; exit 1 on a violation, 2 on an unusable golden file."""
    from dsv4.common.parity.report import comparison_table

    tol = Tolerances.load(ns.tolerances)
    source = _resolve_source(ns, model_source)
    ops = make_backend(ns.backend, ns.device)
    try:
        # integrity, config and checkpoint identity first: building the model may take minutes, or not fit here
        header = load_golden(ns.golden, source.config_hash, source.checkpoint_hash)
        model = source.factory(ops, header.run.dtype)
        golden = load_golden(ns.golden, model.args.arch_hash(), source.checkpoint_hash)
    except GoldenError as e:
        print(f"dsv4 parity compare: error: {e}", file=sys.stderr)
        return 2
    comp = compare_golden(golden, model, tol, label=ns.backend)
    print(f"golden: {golden.metadata.get('backend')} on {golden.metadata.get('device')} "
          f"(torch {golden.metadata.get('torch')})")
    print(comparison_table([comp]))
    for v in comp.violations:
        print(f"VIOLATION {v}")
    if ns.report:
        _report(ns.report, [comp], title=f"dsv4 parity compare: {ns.golden}")
    return 0 if comp.ok else 1


def cmd_bisect(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity bisect --backends A B`: name the first op and layer where B leaves A."""
    from dsv4.common.parity.report import bisect_table

    tol = Tolerances.load(ns.tolerances)
    source = _resolve_source(ns, model_source)
    a, b = ns.backends
    ops_a, ops_b = make_backend(a, ns.device), make_backend(b, ns.device)
    dtype = parse_dtype(ns.dtype[0])
    prompts = _prompts_for(ns, _vocab_size(source, ops_a), tol)
    res = bisect(source.factory, ops_a, ops_b, prompts, dtype, tol, pair=ns.pair, label_a=a, label_b=b,
                 decode_steps=_decode_steps(ns, tol))
    print(bisect_table(res, only_failures=not ns.verbose))
    print(res.summary())
    if ns.report:
        _report(ns.report, [], bisects=[res], title=f"dsv4 parity bisect: {a} vs {b}")
    return 0 if res.ok else 1


def cmd_endpoint(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """`dsv4 parity endpoint --url ...`: common/parity/endpoint.py (loads its reference through runtime.loading)."""
    from dsv4.common.parity.endpoint import cmd_endpoint as run

    return run(ns, model_source)


COMMANDS: dict[str, Callable[[argparse.Namespace, ModelSource | None], int]] = {
    "run": cmd_run, "record": cmd_record, "compare": cmd_compare, "bisect": cmd_bisect, "endpoint": cmd_endpoint}


def add_parity_arguments(subparsers: Any,
                         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """Add `parity {run,record,compare,bisect,endpoint}` to a CLI's subparsers. Each sub-command sets ns.parity_command;
    dispatch with run_parity(ns, model_source). Model options (--config/--seed/--kv-fp8-sim) describe the embedded
    random model; a CLI with real checkpoints passes its own ModelSource instead, and `extra(parser)` adds its
    options (e.g. --checkpoint) to every parity sub-command."""
    p = subparsers.add_parser("parity", help="prove two backends agree; find the op to blame when they do not")
    sub = p.add_subparsers(dest="parity_command", required=True)

    def common(sp: argparse.ArgumentParser, dtypes_multi: bool) -> None:
        sp.add_argument("--tolerances", default=None, help="tolerance YAML (default configs/parity.yaml)")
        sp.add_argument("--device", default=None, help="device for the real backends (default: the backend's)")
        sp.add_argument("--config", default=None, help="embedded random model config (default tiny; `run` without "
                        "--config/--backends/--dtype runs the default suite)")
        sp.add_argument("--seed", type=int, default=0, help="embedded random model seed")
        sp.add_argument("--weight-init", choices=("plain", "structured"), default="plain",
                        help="embedded random model: structured weights vary per quantisation block and have "
                             "outlier channels, so number-format bugs change the output")
        sp.add_argument("--kv-fp8-sim", choices=("e4m3", "clamp"), default=None,
                        help="override the config's KV FP8 simulation (clamp: continuous model, tight bounds)")
        sp.add_argument("--dtype", nargs="+" if dtypes_multi else 1, default=None if dtypes_multi else ["fp32"],
                        choices=("fp32", "bf16"), help="default fp32")
        sp.add_argument("--batch", type=int, default=None, help="prompts (default: parity.yaml suite.batch)")
        sp.add_argument("--seq-len", type=int, default=None, help="prompt length (default: suite.seq_len)")
        sp.add_argument("--prompt-seed", type=int, default=0)
        sp.add_argument("--decode-steps", type=int, default=None, help="one-token steps after the prefill")
        sp.add_argument("--report", default=None, help="directory for report.md and the error-growth plot")
        add_threads_argument(sp)
        if extra:
            extra(sp)

    r = sub.add_parser("run", help="all backends this machine can run, every pair, table; exit 1 on a violation")
    common(r, True)
    r.add_argument("--backends", nargs="+", default=None, metavar="LABEL",
                   help="only these backends (labels as printed, e.g. reference 'ascend(emulated)' cuda)")
    r.add_argument("--include-interpreted", action="store_true",
                   help="also run the CUDA backend in the Triton interpreter on CPU (slow)")
    r.add_argument("--allow-fallback", action="store_true",
                   help="default suite: do not fail a pair whose Ascend side fell back to torch for a fused op its "
                        "chip supports")
    r.add_argument("--skip-cost", action="store_true",
                   help="default suite: skip the reported FP8-vs-W8A8 cost pair of 910B / 910C")
    rec = sub.add_parser("record", help="write a golden file from one backend")
    common(rec, False)
    rec.add_argument("--backend", required=True, help="reference | ascend | cuda | ascend(emulated) | ...")
    rec.add_argument("--out", required=True, help="golden .safetensors to write")
    rec.add_argument("--no-hidden", action="store_true", help="do not store per-layer activations")
    cmp_ = sub.add_parser("compare", help="check a backend against a golden file; exit 1 on a violation")
    common(cmp_, False)
    cmp_.add_argument("golden", help="golden .safetensors from `parity record`")
    cmp_.add_argument("--backend", required=True)
    bis = sub.add_parser("bisect", help="first op and layer where backend B diverges from A")
    common(bis, False)
    bis.add_argument("--backends", nargs=2, required=True, metavar=("A", "B"))
    bis.add_argument("--verbose", action="store_true", help="print every op, not only the failing ones")
    from dsv4.common.parity.endpoint import add_endpoint_arguments

    add_endpoint_arguments(sub, extra)


    bis.add_argument("--pair", default=None, help="configs/parity.yaml pair key to judge by (default: from the "
                     "labels; e.g. reference-ascend_emulated, reference-ascend_w8a8 for the default suite's bounds)")
    return p


def check_parity_arguments(ns: argparse.Namespace) -> None:
    """0 for --batch/--seq-len used to mean "the suite default" silently; a negative count meant nonsense later."""
    for flag in ("batch", "seq_len"):
        v = getattr(ns, flag, None)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if getattr(ns, "decode_steps", None) is not None and ns.decode_steps < 0:
        raise ValueError(f"--decode-steps must be >= 0, got {ns.decode_steps}")
    if ns.tolerances and not Path(ns.tolerances).is_file():
        raise ValueError(f"--tolerances {ns.tolerances}: no such file")


def run_parity(ns: argparse.Namespace, model_source: ModelSource | None = None) -> int:
    """Dispatch a parsed `parity` command. Returns the exit status (0 ok, 1 violation, 2 unusable input)."""
    try:
        check_parity_arguments(ns)
        return COMMANDS[ns.parity_command](ns, model_source)
    except (BackendUnavailable, NonFiniteError, NonFiniteLogitsError, KeyError, ValueError, MemoryError) as e:
        print(f"dsv4 parity {ns.parity_command}: error: {e}", file=sys.stderr)
        return 2
