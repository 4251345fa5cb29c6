"""The fan-out's own health as a prometheus_client collector: errors and drops per sink."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric


class SinkHealthCollector:
    """Yield ``traintel_sink_errors_total{sink}`` and ``traintel_sink_dropped_records_total{sink}``.

    ``errors`` is read at scrape time (the fan-out's live counts); ``dropped()`` is called at
    scrape time for the counts of the sinks that drop records.
    """

    def __init__(self, errors: Mapping[str, int], dropped: Callable[[], Mapping[str, int]]) -> None:
        self.errors = errors
        self.dropped = dropped

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "traintel_sink_errors", "Records a sink failed to take.", labels=["sink"]
        )
        for sink, count in sorted(self.errors.items()):
            errors.add_metric([sink], float(count))
        yield errors
        dropped = CounterMetricFamily(
            "traintel_sink_dropped_records",
            "Records a sink dropped because its consumer fell behind.",
            labels=["sink"],
        )
        for sink, count in sorted(self.dropped().items()):
            dropped.add_metric([sink], float(count))
        yield dropped
