"""Operators per layer per decode step, counted with a TorchDispatchMode, for each backend and both decode paths.

What is counted: every aten op that reaches the dispatcher (views and metadata ops included: each is a dispatch in
eager mode), attributed to the layer whose block is running; "outside" = embedding and head. A backend's fused
operator counts as ONE launch however it is computed here: an emulated torch_npu op (ascend/emulation, pure torch on
the CPU) or an interpreted Triton kernel (cuda/, TRITON_INTERPRET=1) is one op, and the aten ops inside it are not
counted (they are the emulation, not what the device runs). The emulation's internals are reported separately
("with emulation internals") because they are what an earlier count of ~830 per layer included.

Paths: "eager" = the model's forward (transformer.py) for one token; "static" = the static-shape step
(common/model/static.py) that torch.compile / TorchAir / CUDA graphs capture, run uninterpreted.

    python scripts/count_decode_ops.py                         # prints a markdown section
    python scripts/count_decode_ops.py --markdown BENCHMARKS.md  # also writes it (only this script's section)
    python scripts/count_decode_ops.py --only 950dt --by-seam    # where the ops go, per ops-seam method

`--by-seam` attributes every op to the outermost ops-seam method (backend call: linear, rope, moe_experts...) that
issued it; "graph" is the model's own glue between them (transformer.py / static.py: cat, slices, index writes).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shlex
import sys
import types
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs (shared/notes/toolchain.md)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import dsv4.common.model.static as static  # noqa: E402
from dsv4.common.bench.report import write_marked_section  # noqa: E402
from dsv4.common.checkpoint.load import build_random_model  # noqa: E402
from dsv4.common.model.config import load_named_config  # noqa: E402
from dsv4.common.runtime.static_decode import StaticDecoder  # noqa: E402

VIEW_OPS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "slice", "select", "t", "transpose", "permute", "expand",
            "alias", "as_strided", "detach", "lift_fresh", "unflatten", "unbind", "split", "chunk", "reshape",
            "movedim", "narrow"}  # metadata only: no kernel runs for them in a captured graph
PROMPT = 300  # every layer kind has entries: 75 CSA blocks (> index_topk 16), 2 HCA blocks; the ring has wrapped


class OpCounter(TorchDispatchMode):
    """Counts aten ops per scope; inside a fused launch (`fused`) counts that launch once and its internals apart."""

    def __init__(self) -> None:
        super().__init__()
        self.scope = "outside"
        self.seam = "graph"  # the ops-seam method running (outermost), "graph" = the model's own glue
        self.counts: collections.Counter = collections.Counter()  # (scope, op) -> n
        self.by_seam: collections.Counter = collections.Counter()  # (scope, seam, op) -> n
        self.calls: collections.Counter = collections.Counter()  # (scope, seam) -> outermost calls
        self.internal: collections.Counter = collections.Counter()  # scope -> aten ops inside fused launches
        self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._inside:
            self.internal[self.scope] += 1
        else:
            op = str(func.overloadpacket.__name__)
            self.counts[(self.scope, op)] += 1
            self.by_seam[(self.scope, self.seam, op)] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def fused(self, name: str):
        if not self._inside:
            self.counts[(self.scope, name)] += 1
            self.by_seam[(self.scope, self.seam, name)] += 1
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    @contextlib.contextmanager
    def in_seam(self, name: str):
        """Attribute the aten ops of an ops-seam call (the outermost one: a method calling another stays in it)."""
        outer = self.seam
        if outer == "graph":
            self.seam = name
            self.calls[(self.scope, name)] += 1
        try:
            yield
        finally:
            self.seam = outer

    def per_scope(self) -> dict[str, int]:
        out: collections.Counter = collections.Counter()
        for (scope, _), n in self.counts.items():
            out[scope] += n
        return dict(out)


def count_fused_launches(counter: OpCounter, ops) -> None:
    """Make every torch_npu op of an AscendOps, and every Triton launch, count as one op."""
    npu = getattr(ops, "npu", None)
    if npu is not None and not isinstance(npu, _CountingNpu):
        ops.npu = _CountingNpu(npu, counter)
    if ops.name == "cuda":
        import triton.runtime.interpreter as interp

        if not getattr(interp.GridExecutor, "_counted", False):
            call = interp.GridExecutor.__call__

            def counted(self, *a, **k):
                with COUNTER_HOLDER[0].fused(f"triton.{self.fn.__name__}"):
                    return call(self, *a, **k)

            interp.GridExecutor.__call__, interp.GridExecutor._counted = counted, True
    COUNTER_HOLDER[0] = counter


COUNTER_HOLDER: list[OpCounter] = [OpCounter()]


class _CountingNpu(types.SimpleNamespace):
    def __init__(self, npu, counter: OpCounter) -> None:
        super().__init__()
        self._npu = npu

    def __getattr__(self, name):
        fn = getattr(self._npu, name)
        if not callable(fn) or not name.startswith("npu_"):
            return fn

        def launch(*a, **k):
            with COUNTER_HOLDER[0].fused(f"npu.{name}"):
                return fn(*a, **k)

        return launch


@contextlib.contextmanager
def layer_scopes(model, counter: OpCounter):
    """Attribute ops to layers: hooks on the blocks (eager path) and a wrapper of static.block_step."""
    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=i: setattr(counter, "scope", f"layer {i}")))
        handles.append(layer.register_forward_hook(lambda *_: setattr(counter, "scope", "outside")))
    orig = static.block_step

    def scoped(layer, *a, **k):
        counter.scope = f"layer {layer.layer_id}"
        try:
            return orig(layer, *a, **k)
        finally:
            counter.scope = "outside"

    static.block_step = scoped
    try:
        yield
    finally:
        static.block_step = orig
        for h in handles:
            h.remove()


SEAM_METHODS = ("indexer_scores", "all_reduce", "all_gather", "prepare_rope")  # beside OP_NAMES


def seam_scopes(ops, decoder, counter: OpCounter) -> None:
    """Attribute ops to the ops-seam method (backend call) that issues them: every seam method of this ops object,
    and the static step's routed-experts function, is wrapped on the instance."""
    from dsv4.common.model.ops import OP_NAMES

    def wrap(fn, name):
        def seam(*a, **k):
            with counter.in_seam(name):
                return fn(*a, **k)

        return seam

    for name in (*OP_NAMES, *SEAM_METHODS):
        if hasattr(ops, name):
            setattr(ops, name, wrap(getattr(ops, name), name))
    if decoder.routed is not None:
        decoder.routed = wrap(decoder.routed, "moe_experts (static routed_experts)")


def make_ops(backend: str, chip: str | None):
    if backend == "reference":
        from dsv4.common.model.reference import ReferenceOps

        return ReferenceOps()
    if backend == "ascend":
        from dsv4.ascend import create_ops

        return create_ops(emulate=True, chip=chip)
    from dsv4.cuda.backend import CudaOps

    return CudaOps("cpu")


# V4's attention dims (head_dim 512 with 64 rope dims, 64 indexer heads), where the 950's fused sparse flash attention
# and lightning indexer take the call; the tiny model's head_dim 128 / 4 indexer heads fall back to torch there
FLASH_ATTENTION_DIMS = dict(head_dim=512, index_n_heads=64)
# every width of V4-Flash (configs/flash.yaml) on the tiny model's four layer kinds, with 8 routed experts (the fused
# MoE's op count does not grow with them) and a small vocabulary (outside the layers): what a layer of the release
# issues. About 5 minutes per backend on 2 cores (--flash-dims)
FLASH_DIMS = dict(dim=4096, n_heads=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, head_dim=512,
                  moe_inter_dim=2048, n_activated_experts=6, index_n_heads=64, index_head_dim=128, index_topk=512,
                  route_scale=1.5, n_hash_layers=1, vocab_size=1024)


def count(backend: str, chip: str | None, dtype: torch.dtype, weights: str, path: str, batch: int,
          changes: dict | None = None) -> dict:
    args = load_named_config("tiny").replace(**(changes or {}))
    from dsv4.common.model.reference import ReferenceOps

    model = build_random_model(args, ReferenceOps(), dtype, seed=0, weights=weights)
    toks = torch.randint(2, args.vocab_size, (batch, PROMPT + 2), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch, 1024)
    model(toks[:, :PROMPT], cache)  # the prompt through the reference (fast); only the decode steps on the backend
    model.ops = ops = make_ops(backend, chip)  # the graph takes every primitive from model.ops
    decoder = StaticDecoder(model, cache, batch_sizes=(batch,), capture="eager")

    def step(i: int) -> None:
        if path == "eager":
            model(toks[:, i:i + 1], cache)
        else:
            decoder.step(toks[:, i], list(range(batch)))

    step(PROMPT)  # not counted: a backend converts weights to its formats once, at their first use
    counter = OpCounter()
    count_fused_launches(counter, ops)
    seam_scopes(ops, decoder, counter)
    with layer_scopes(model, counter), counter:
        step(PROMPT + 1)
    scopes = counter.per_scope()
    layers = [v for k, v in scopes.items() if k.startswith("layer")]
    inside = sum(n for s, n in counter.internal.items() if s.startswith("layer"))
    by_op: collections.Counter = collections.Counter()
    for (scope, op), n in counter.counts.items():
        if scope.startswith("layer"):
            by_op[op] += n
    compute = sum(n for op, n in by_op.items() if op not in VIEW_OPS) / len(layers)
    seams: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # seam -> op -> n
    calls: collections.Counter = collections.Counter()  # seam -> outermost calls, all layers
    for (scope, seam), n in counter.calls.items():
        if scope.startswith("layer"):
            calls[seam] += n
    for (scope, seam, op), n in counter.by_seam.items():
        if scope.startswith("layer"):
            seams[seam][op] += n
    # per layer kind (compress ratio 0 / 4 / 128): mean ops and mean ops without views over the layers of that kind
    kind_ops: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for scope, n in scopes.items():
        if scope.startswith("layer"):
            views = sum(k for (s, op), k in counter.counts.items() if s == scope and op in VIEW_OPS)
            kind_ops[args.compress_ratios[int(scope.split()[1])]].append((n, n - views))
    kinds = {r: (sum(n for n, _ in v) / len(v), sum(c for _, c in v) / len(v)) for r, v in kind_ops.items()}
    return dict(kinds=kinds, per_layer=sum(layers) / len(layers), compute=compute, layers=layers,
                outside=scopes.get("outside", 0),
                total=sum(scopes.values()), fused=sum(n for (s, op), n in counter.counts.items()
                                                      if s.startswith("layer") and "." in op) / len(layers),
                internals=(sum(layers) + inside) / len(layers), top=by_op.most_common(8), seams=seams,
                calls=calls, n_layers=len(layers))


def seam_report(label: str, res: dict) -> str:
    """Per layer, by ops-seam method: all ops, ops without views, and the aten ops that make them up."""
    n = res["n_layers"]
    rows = sorted(res["seams"].items(), key=lambda kv: -sum(kv[1].values()))
    out = [f"### {label}: static step, ops per layer by ops-seam method", "",
           "| seam method | calls/layer | ops/layer | without views | top aten ops (per layer) |",
           "|---|---:|---:|---:|---|"]
    for seam, ops in rows:
        total, compute = sum(ops.values()) / n, sum(v for k, v in ops.items() if k not in VIEW_OPS) / n
        top = ", ".join(f"{k} {v / n:g}" for k, v in ops.most_common(8))
        out.append(f"| {seam} | {res['calls'].get(seam, 0) / n:g} | {total:g} | {compute:g} | {top} |")
    return "\n".join(out) + "\n"


KIND_NAMES = {0: "window-only", 4: "CSA", 128: "HCA"}


def kind_report(rows: list) -> str:
    """The static step per layer kind, and the mean over V4-Flash's own layers (configs/flash.yaml: its ratios for
    n_layers, the MTP layer not included), weighting each kind's count by how many layers of that kind it has."""
    flash = load_named_config("flash")
    mix = collections.Counter(flash.compress_ratios[:flash.n_layers])
    head = " | ".join(f"{KIND_NAMES[r]} ({mix[r]} in V4-Flash)" for r in sorted(mix))
    out = ["Static step per layer kind: ops per layer (without view ops). The last column weights each kind by its "
           f"number of layers in V4-Flash ({flash.n_layers} layers): what a decode step of the release issues per "
           "layer on average.", "", f"| backend | {head} | V4-Flash's layer mix |", "|---|" + "---:|" * (len(mix) + 1)]
    for label, _, res in rows:
        kinds = res["static"]["kinds"]
        cells = [f"{kinds[r][0]:.0f} ({kinds[r][1]:.0f})" if r in kinds else "-" for r in sorted(mix)]
        n = sum(mix.values())
        mean = [sum(kinds[r][i] * k for r, k in mix.items()) / n for i in (0, 1)] if set(mix) <= set(kinds) else None
        out.append(f"| {label} | " + " | ".join(cells) + (f" | {mean[0]:.0f} ({mean[1]:.0f}) |" if mean else " | - |"))
    return "\n".join(out)


CASES = [  # (label, backend, chip, dtype, weights[, config changes])
    ("reference fp32", "reference", None, torch.float32, "dequantized"),
    ("reference bf16", "reference", None, torch.bfloat16, "dequantized"),
    ("ascend 950dt bf16 (emulated)", "ascend", "950dt", torch.bfloat16, "quantized"),
    ("ascend 950dt bf16 dequantized (emulated)", "ascend", "950dt", torch.bfloat16, "dequantized"),
    ("ascend 950dt bf16, V4 attention dims (emulated)", "ascend", "950dt", torch.bfloat16, "quantized",
     FLASH_ATTENTION_DIMS),
    ("ascend 950pr bf16 (emulated)", "ascend", "950pr", torch.bfloat16, "quantized"),
    ("ascend 910c bf16 (emulated)", "ascend", "910c", torch.bfloat16, "quantized"),
    ("ascend 910b bf16 (emulated)", "ascend", "910b", torch.bfloat16, "quantized"),
    ("cuda fp32 (Triton interpreter)", "cuda", None, torch.float32, "quantized"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--only", default=None, help="run only cases whose label contains this text")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--flash-dims", action="store_true",
                   help="also count emulated 950DT bf16 at every width of V4-Flash (4 layers, 8 experts; ~5 min)")
    p.add_argument("--by-seam", nargs="?", const="", default=None, metavar="LABEL",
                   help="also give, for the cases whose label contains LABEL (all without one), the static step's "
                        "ops per layer grouped by ops-seam method (printed, and written with --markdown)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = load_named_config("tiny")
    rows, seam_tables = [], []
    cases = CASES + ([("ascend 950dt bf16, V4-Flash dims (emulated)", "ascend", "950dt", torch.bfloat16, "quantized",
                       FLASH_DIMS)] if a.flash_dims else [])
    for label, backend, chip, dtype, weights, *changes in cases:
        if a.only and a.only not in label:
            continue
        res = {path: count(backend, chip, dtype, weights, path, a.batch, *changes) for path in ("eager", "static")}
        rows.append((label, weights, res))
        if a.by_seam is not None and a.by_seam in label:
            seam_tables.append(seam_report(label, res["static"]))
        e, s = res["eager"], res["static"]
        print(f"{label:42s} eager {e['per_layer']:7.1f}  static {s['per_layer']:7.1f} per layer "
              f"(layers {s['layers']}, outside {s['outside']}, fused {s['fused']:.1f}); top {s['top'][:5]}",
              file=sys.stderr)
    cmd = "python scripts/count_decode_ops.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = ["## Operators per decode step (scripts/count_decode_ops.py)", "",
           f"Command: `{cmd.strip()}`", "",
           f"Tiny model (dim {args.dim}, layers {args.compress_ratios[:args.n_layers]}, {args.n_routed_experts} "
           f"experts top-{args.n_activated_experts}, hc_mult {args.hc_mult}, {args.hc_sinkhorn_iters} Sinkhorn "
           f"iterations), random weights, batch {a.batch}, the second decode step after a {PROMPT}-token prompt "
           f"(the first converts weights); torch "
           f"{torch.__version__}. Counted with a TorchDispatchMode: every aten op (views included), per layer = "
           "mean over the 4 layers, outside = embedding + head. A fused torch_npu op (emulated) or a Triton launch "
           "(interpreted) counts as one op; `without view ops` drops metadata-only ops (view, slice, unsqueeze...: no "
           "kernel in a captured graph); `with internals` adds the aten ops the CPU emulation of the torch_npu ops "
           "spends inside them (not device launches). eager = the model's forward; static = the captured step "
           "(common/model/static.py) run uninterpreted." + (
               " `V4-Flash dims` (--flash-dims): every width of configs/flash.yaml on the same four layer kinds, with "
               "8 routed experts and a vocabulary of 1024." if a.flash_dims else ""), "",
           "| backend | weights | eager ops/layer | static ops/layer | static without view ops | of which fused "
           "launches | static outside layers | static with internals |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, weights, res in rows:
        e, s = res["eager"], res["static"]
        out.append(f"| {label} | {weights} | {e['per_layer']:.0f} | {s['per_layer']:.0f} | {s['compute']:.0f} | "
                   f"{s['fused']:.0f} | "
                   f"{s['outside']} | {s['internals']:.0f} |")
    out += ["", kind_report(rows)]
    section = "\n".join(out) + "\n" + "".join("\n" + t for t in seam_tables)
    print(section)
    if a.markdown:
        write_marked_section(a.markdown, "count_decode_ops", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
