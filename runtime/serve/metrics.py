"""Prometheus metrics of ``tprun serve``: one object shared by the engine and the HTTP layer.

Why one object: the engine knows about steps, tokens and the KV cache, the HTTP layer knows about
routes and status codes; both write into the same private registry, and ``GET /metrics`` renders it
once. A private ``CollectorRegistry`` (not prometheus_client's global one) lets tests and several
servers in one process each have their own counters.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# Without this every counter and histogram also exports a `*_created` timestamp series, which
# doubles the scrape for no use (vLLM turns it off too). It is process-wide by design in the client.
disable_created_metrics()

# The classic text format every Prometheus version scrapes (the client's default moved to 1.0.0).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Bucket edges in seconds, the same as vLLM's so dashboards built for it read ours unchanged.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """Counters, gauges and histograms of one server; every method is thread-safe.

    Hooks the ENGINE calls (from its step thread; each is cheap enough to call every step):

    - ``on_step(running, waiting, kv_usage)``: after each scheduler step, the number of running and
      waiting requests and the fraction of KV-cache blocks in use (0.0 to 1.0).
    - ``on_first_token(seconds)``: once per request, arrival to its first generated token.
    - ``on_token_gap(seconds)``: for every later token, the time since the request's previous token.
    - ``on_request_done(prompt_tokens, completion_tokens, seconds)``: once per finished or aborted
      request, with its token counts (all n samples together) and arrival-to-finish time.
    - ``on_prefix_cache(queried_tokens, hit_tokens)``: once per admitted prompt, how many prompt
      tokens were looked up in the prefix cache and how many were found.
    - ``on_preemption()``: each time a running request is preempted for lack of KV blocks.
    - ``on_step_failure()``: each time a step raised (a server fault: its requests end with HTTP 500).

    The HTTP layer calls ``on_http_response(route, status)``; ``render()`` gives the exposition
    text for ``GET /metrics`` (and for the engine's ``metrics_text()``).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tprun_requests_total", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("tprun_prompt_tokens_total", "Prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("tprun_generation_tokens_total",
                                         "Generated tokens of finished requests", registry=r)
        self.running = Gauge("tprun_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("tprun_requests_waiting", "Requests waiting for admission", registry=r)
        self.kv_usage = Gauge("tprun_kv_cache_usage_ratio",
                              "Fraction of KV-cache blocks in use (1 = full)", registry=r)
        self.prefix_queries = Counter("tprun_prefix_cache_queries_total",
                                      "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("tprun_prefix_cache_hits_total",
                                   "Prompt tokens found in the prefix cache", registry=r)
        self.preemptions = Counter("tprun_preemptions_total",
                                   "Requests preempted for lack of KV-cache blocks", registry=r)
        self.step_failures = Counter("tprun_engine_step_failures_total",
                                     "Engine steps that raised; their requests ended with a server error",
                                     registry=r)
        self.ttft = Histogram("tprun_time_to_first_token_seconds",
                              "Arrival to first generated token", buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tprun_inter_token_latency_seconds",
                             "Time between consecutive tokens of a request", buckets=_ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("tprun_e2e_request_latency_seconds", "Arrival to finish of a request",
                             buckets=_E2E_BUCKETS, registry=r)

    # --- hooks for the engine ---
    def on_step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_request_done(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(seconds)

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def on_preemption(self) -> None:
        self.preemptions.inc()

    def on_step_failure(self) -> None:
        self.step_failures.inc()

    # --- for the HTTP layer ---
    def on_http_response(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        """Prometheus text format 0.0.4 of everything above (serve with ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
