"""Cache statistics: shared counters, reports, Prometheus metrics, the admin listener and dashboard."""
