"""The Prometheus exporter: the sink and its collector, the HTTP(S) server, the Pushgateway."""
