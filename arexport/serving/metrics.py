"""Prometheus metrics of a GenerationService (one registry per service)."""

from __future__ import annotations


class Metrics:
    """Queue depth, batch occupancy, latency histograms, forward passes, request outcomes."""

    def __init__(self):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:  # pragma: no cover - part of the [serve] extra
            raise ImportError(f"serving metrics need prometheus-client (pip install 'arexport[serve]'): {e}") from None
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("arexport_queue_depth", "Requests waiting to start", registry=r)
        self.batch_occupancy = Gauge("arexport_batch_occupancy", "Fraction of batch slots in use at the last step", registry=r)
        self.occupancy_hist = Histogram("arexport_batch_occupancy_ratio", "Batch occupancy per engine step",
                                        buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), registry=r)
        self.latency = Histogram("arexport_request_seconds", "Request latency from submission to result", ["method"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.step_seconds = Histogram("arexport_step_seconds", "Seconds per batched engine step (or merged generation)",
                                      buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5), registry=r)
        self.forwards = Counter("arexport_forward_passes", "Model forward passes (batched calls count once)", registry=r)
        self.images = Counter("arexport_images", "Images generated", registry=r)
        self.requests = Counter("arexport_requests", "Finished requests by outcome", ["method", "outcome"], registry=r)
        self.rejected = Counter("arexport_rejected", "Requests refused before running", ["reason"], registry=r)
        self.outstanding = Gauge("arexport_outstanding_images", "Images queued or running (admission control)", registry=r)
        self.lanes = Gauge("arexport_lanes", "Batches (sessions) kept, one per method and options (two where guided "
                           "and unguided requests meet)", registry=r)
        self.lane_bytes = Gauge("arexport_lane_bytes", "Bytes of the lanes' KV caches", registry=r)
        self.resident = Gauge("arexport_process_resident_bytes", "Resident memory of the serving process (read at scrape)",
                              registry=r)
        self.http = Counter("arexport_http_responses", "HTTP responses by status (refusals by the HTTP layer included)",
                            ["status"], registry=r)

    def record_step(self, seconds: float, forwards: int, occupancy: float) -> None:
        """One batched engine step (or merged generation): its time, forward passes and slot occupancy."""
        self.step_seconds.observe(seconds)
        self.forwards.inc(forwards)
        self.batch_occupancy.set(occupancy)
        self.occupancy_hist.observe(occupancy)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        from arexport.budget import rss_bytes

        self.resident.set(rss_bytes())
        return generate_latest(self.registry)
