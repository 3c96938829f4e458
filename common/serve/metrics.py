"""Prometheus metrics of `dsv4 serve` (GET /metrics), on a registry of their own per app (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsv4.common.runtime.engine import Engine, Request

# latency buckets in seconds: CPU decode steps of the tiny model are milliseconds, real cards' tens of ms
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsv4_requests", "Requests by how they ended (stop, length, abort, error) or were "
                                "refused (rejected_400, rejected_413, rejected_503)", ["status"], registry=r)
        waiting = Gauge("dsv4_requests_waiting", "Requests queued for a cache slot", registry=r)
        running = Gauge("dsv4_requests_running", "Requests holding a cache slot (prefilling or decoding)", registry=r)
        waiting.set_function(lambda: engine.num_waiting)
        running.set_function(lambda: engine.num_running)
        for key, what in (("blocks_used", "KV blocks allocated to sequences"),
                          ("blocks_free", "KV blocks free for new sequences (the free list + cached prefix blocks "
                                          "no sequence holds)"),
                          ("blocks_reserved", "KV blocks promised to running requests (their prompt + max_tokens)"),
                          ("blocks_total", "KV blocks in the pool (--kv-blocks)")):
            g = Gauge(f"dsv4_kv_{key}", what, registry=r)
            g.set_function(lambda key=key: engine.pool_stats()[key])
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             buckets=ITL_BUCKETS, registry=r)
        if engine.prefix_cache is not None:
            r.register(PrefixCacheCollector(engine))

    def finished(self, req: Request) -> None:
        st = req.stats
        self.requests.labels(status=req.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(st.prompt_tokens)
        self.generation_tokens.inc(st.new_tokens)
        if st.first_token_at is not None:
            self.ttft.observe(st.first_token_at - st.arrival)
        for a, b in zip(st.token_times, st.token_times[1:], strict=False):
            self.itl.observe(b - a)

    def total_requests(self) -> int:
        return int(sum(s.value for m in self.requests.collect() for s in m.samples if s.name.endswith("_total")))

    def rejected(self, status: int) -> None:
        self.requests.labels(status=f"rejected_{status}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PrefixCacheCollector:
    """The engine's own prefix-cache counters, read at scrape time (the engine thread counts them)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        st = self.engine.prefix_stats
        hits, misses, tokens, evicted = (0, 0, 0, 0) if st is None else (st.hits, st.misses, st.hit_tokens,
                                                                         st.evicted_blocks)
        yield CounterMetricFamily("dsv4_prefix_cache_hits", "Requests resumed from a cached prompt prefix",
                                  value=hits)
        yield CounterMetricFamily("dsv4_prefix_cache_misses", "Requests that found no cached prefix", value=misses)
        yield CounterMetricFamily("dsv4_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache "
                                  "instead of prefilled", value=tokens)
        yield CounterMetricFamily("dsv4_prefix_cache_evicted_blocks", "Cached blocks evicted (LRU, byte budget)",
                                  value=evicted)
        yield GaugeMetricFamily("dsv4_prefix_cache_blocks_idle", "KV blocks only the prefix cache holds (counted "
                                "free: the allocator takes them back when needed)",
                                value=self.engine.runner.blocks_cached_only())
        yield GaugeMetricFamily("dsv4_prefix_cache_bytes", "Bytes the prefix cache holds (blocks + snapshots)",
                                value=self.engine.prefix_cache_bytes)
