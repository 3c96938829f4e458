"""`dsv4 serve`: arguments, and start-up on one process or several (torchrun).

Under torchrun, rank 0 serves HTTP and schedules; every other rank replays rank 0's engine calls
(runtime/engine_runner.py: Mirror, follow), so each step's batch runs through the same collectives everywhere.
SIGTERM drains: the listening socket closes, requests in flight finish (up to --drain-timeout seconds, then they
end with an error), the other ranks are released and the process exits.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from dsv4.common.runtime.engine_decode import BATCHED_DECODE_MIN_ROWS
from dsv4.common.runtime.generate import add_compile_decode_argument, add_kv_pool_arguments, kv_pool_options
from dsv4.common.runtime.prefix_cache import add_prefix_cache_arguments, prefix_cache_options
from dsv4.common.runtime.static_decode import compile_mode


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000,
                   help="port to listen on (default: 8000; 0 = a free one, printed in the 'serving' line); it is bound "
                        "before the model loads, so a port in use fails at once")
    g.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: the checkpoint folder's name, or dsv4-<config>)")
    g.add_argument("--max-batch", type=int, default=16, help="cache slots: requests running at once")
    g.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill forward")
    g.add_argument("--long-prefill-chunk", type=int, default=None,
                   help="prompt tokens per step of a prompt longer than --prefill-chunk (default: --prefill-chunk); "
                        "smaller = less delay for short requests beside a long prompt, slower long prefill")
    g.add_argument("--step-tokens", type=int, default=None,
                   help="tokens per engine step, decodes first (default: --prefill-chunk + --max-batch)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the running ones; more get 503 + Retry-After")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    g.add_argument("--max-logprobs", type=int, default=20, help="the most logprobs/top_logprobs a request may ask")
    g.add_argument("--speculative", action="store_true",
                   help="MTP self-speculative decoding for greedy requests without logprobs or stop strings "
                        "(others decode plainly)")
    add_compile_decode_argument(g)
    add_kv_pool_arguments(g)
    g.add_argument("--batched-decode-min-rows", type=int, default=BATCHED_DECODE_MIN_ROWS, metavar="N",
                   help="without --compile-decode, decode steps of N or more rows feed every row's compressors at once "
                        f"(default {BATCHED_DECODE_MIN_ROWS}; 0 = always the eager forward, which groups rows by "
                        "position; rows all at one position always take it)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight before ending them")
    add_prefix_cache_arguments(p.add_argument_group("prefix cache"))


def check_serve_arguments(ns: argparse.Namespace) -> None:
    """The serving flags' ranges, checked before the port is bound or the model loads (one line naming the flag):
    a 0 or a negative count would otherwise start a server that stalls, refuses everything or silently takes a
    default."""
    at_least = [("--max-batch", ns.max_batch, 1), ("--prefill-chunk", ns.prefill_chunk, 1),
                ("--long-prefill-chunk", ns.long_prefill_chunk, 1), ("--step-tokens", ns.step_tokens, 1),
                ("--max-waiting", ns.max_waiting, 0), ("--max-body-bytes", ns.max_body_bytes, 1),
                ("--max-logprobs", ns.max_logprobs, 0), ("--drain-timeout", ns.drain_timeout, 0),
                ("--batched-decode-min-rows", ns.batched_decode_min_rows, 0)]
    for flag, value, low in at_least:
        if value is not None and value < low:
            zero = " (0 = off)" if flag == "--batched-decode-min-rows" else ""
            raise ValueError(f"{flag} must be >= {low}{zero}, got {value}")


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening) before the model loads: a taken port is one line at once, not
    after minutes of loading, and nothing can take the port between loading and serving (under torchrun the ranks'
    gloo connections draw ephemeral ports from the same range as --port 0)."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn's Config.bind_socket chooses
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def capture_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a server captures its decode step at: powers of two up to max_batch, and max_batch (a
    batch is padded up to the next one, so every running batch has a captured shape)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def build_engine(ns: argparse.Namespace, model, tokenizer, mirror=None):
    """The serving engine the `serve` arguments describe, over a loaded model (scripts/bench_engine.py builds the
    same one without HTTP)."""
    from dsv4.common.runtime.engine import Engine

    block_tokens, kv_blocks = kv_pool_options(ns, model)
    return Engine(model, max_batch=ns.max_batch, max_seq_len=ns.max_seq_len, prefill_chunk=ns.prefill_chunk,
                  step_tokens=ns.step_tokens, max_waiting=ns.max_waiting, tokenizer=tokenizer, mirror=mirror,
                  max_logprobs=ns.max_logprobs, long_prefill_chunk=ns.long_prefill_chunk,
                  compile_decode=compile_mode(ns), compile_batch_sizes=capture_batch_sizes(ns.max_batch),
                  block_tokens=block_tokens, kv_blocks=kv_blocks, prefix_cache=prefix_cache_options(ns, model),
                  batched_decode_min_rows=ns.batched_decode_min_rows or None)


def cmd_serve(ns: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"dsv4 serve needs the [serve] extra ({e.name} is missing): pip install -e '.[serve]'") \
            from None
    from dsv4.common.runtime.distributed import world_from_env
    from dsv4.common.runtime.engine_runner import Mirror
    from dsv4.common.runtime.loading import load_model

    check_serve_arguments(ns)
    rank, world, _ = world_from_env()
    sock = listen_socket(ns.host, ns.port) if rank == 0 else None  # only rank 0 serves HTTP
    model, tokenizer, source = load_model(ns)
    engine = build_engine(ns, model, tokenizer, Mirror() if world > 1 else None)
    loaded = engine.load_prefix_cache()  # every rank reads it (a mirrored call); a refused file stops here
    if rank != 0:
        # rank 0 drains on SIGTERM and then releases this rank; a rank that died on the launcher's SIGTERM at once
        # would leave rank 0's last calls without a peer (the launcher SIGKILLs stragglers after its own timeout)
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine.runner.follow()
        return 0
    from dsv4.common.serve.app import Server, create_app

    name = ns.served_model_name or (Path(ns.model).name if ns.model else f"dsv4-{Path(ns.config).stem}")
    server = Server(engine, tokenizer, name, ns.speculative)
    app = create_app(server, ns.max_body_bytes)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            server.draining = True  # new requests get 503 while those in flight finish
            super().handle_exit(sig, frame)

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=ns.drain_timeout)
    print(f"[dsv4] model: {source}; backend: {model.ops.name}; ranks: {world}", file=sys.stderr)
    if engine.prefix_cache is not None:
        opts = engine.prefix_cache
        print(f"[dsv4] prefix cache: {opts.budget_bytes / 2**20:.0f} MiB"
              + (f", {loaded} blocks loaded from {opts.path}" if opts.path else ""), file=sys.stderr)
    url_host = f"[{host}]" if ":" in host else host
    print(f"[dsv4] serving {name!r} on http://{url_host}:{port}/v1 (Ctrl-C or SIGTERM drains and stops)",
          file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was there before it ran
    # (uvicorn/server.py, capture_signals): that handler is this no-op, so a drained server exits with status 0
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # returns once the requests in flight are done and the engine loop stopped
    DrainingServer(config).run(sockets=[sock])
    if engine.save_prefix_cache():
        print(f"[dsv4] prefix cache written to {engine.prefix_cache.path}", file=sys.stderr)
    print(f"[dsv4] drained and stopped ({server.metrics.total_requests()} requests served)", file=sys.stderr)
    return 0
