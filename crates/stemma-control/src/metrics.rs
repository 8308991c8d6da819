//! `/metrics`: the daemon's Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use stemma_proxy::ProxyMetrics;

/// Counters and histograms updated as things happen; gauges of current state are set when
/// scraped.
pub struct Metrics {
    pub proxy: ProxyMetrics,
    pub suspensions: Counter,
    pub cold_starts: Histogram,
    pub wake_refusals: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            proxy: ProxyMetrics::default(),
            suspensions: Counter::default(),
            // 10 ms .. ~20 s: a cold start is hundreds of milliseconds; crash recovery longer.
            cold_starts: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 12),
            ),
            wake_refusals: Counter::default(),
        }
    }
}

impl Metrics {
    /// The text exposition of every metric, with the current number of running computes and
    /// the total of compute starts.
    pub fn render(&self, computes_running: usize, compute_starts: u64) -> String {
        let mut registry = Registry::with_prefix("stemma");
        let running: Gauge = Gauge::default();
        running.set(computes_running as i64);
        registry.register("computes_running", "Computes running now", running);
        let starts: Counter = Counter::default();
        starts.inc_by(compute_starts);
        registry.register(
            "compute_starts",
            "Computes started (wakes, commands and restarts)",
            starts,
        );
        registry.register(
            "compute_suspensions",
            "Computes suspended (idle timeout, cap, or command)",
            self.suspensions.clone(),
        );
        registry.register(
            "cold_start_seconds",
            "From a connection's wake request to its compute accepting connections",
            self.cold_starts.clone(),
        );
        registry.register(
            "wake_refusals",
            "Connections refused because their compute could not start",
            self.wake_refusals.clone(),
        );
        registry.register(
            "proxy_connections_open",
            "Client connections open through the proxy",
            self.proxy.connections_open.clone(),
        );
        registry.register(
            "proxy_connections",
            "Client connections accepted by the proxy",
            self.proxy.connections_total.clone(),
        );
        registry.register(
            "proxy_client_to_compute_bytes",
            "Bytes relayed from clients to computes",
            self.proxy.bytes_client_to_compute.clone(),
        );
        registry.register(
            "proxy_compute_to_client_bytes",
            "Bytes relayed from computes to clients",
            self.proxy.bytes_compute_to_client.clone(),
        );
        registry.register(
            "proxy_shortcut_connections",
            "Connections whose bytes the kernel passes between client and compute (the proxy's kernel shortcut)",
            self.proxy.shortcut_connections.clone(),
        );
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}
