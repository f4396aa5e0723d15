//! Logging and metrics: `tracing` to stderr, pretty or JSON, filtered by `RUST_LOG`, else by the
//! command: `serve` logs `info` (its lines are the service's record), every other command
//! only warnings and errors unless `-v` (info) or `-vv` (debug) asks for more. Colour codes
//! only when stderr is a terminal, so scripts and log files get plain text.
//!
//! Log lines carry routes, ids and counts; never emails, names, phone numbers, API keys or
//! webhook secrets.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

use crate::config::LogFormat;

/// How much a command logs when `RUST_LOG` does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// `serve`, and `-v` on other commands.
    Info,
    /// Other commands by default: warnings and errors only.
    Quiet,
    /// `-vv`.
    Debug,
}

impl Verbosity {
    fn filter(self) -> &'static str {
        match self {
            Self::Quiet => "warn",
            Self::Info => "info,sqlx=warn,tower_http=warn",
            Self::Debug => "debug,sqlx=info,tower_http=debug,hyper=info,h2=info",
        }
    }
}

pub fn init(format: LogFormat) {
    init_with(format, Verbosity::Info);
}

pub fn init_with(format: LogFormat, verbosity: Verbosity) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(verbosity.filter()));
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(ansi),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true)
                    .flatten_event(true),
            )
            .try_init(),
    };
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = result;
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// How often the recorder folds the histogram samples recorded since into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Upkeeps run so far by the process's recorder.
static UPKEEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Upkeeps the process's recorder has run (see [`UPKEEP_EVERY`]).
#[cfg(test)]
fn upkeeps() -> u64 {
    UPKEEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The Prometheus recorder keeps every histogram sample (each request's latency, each
/// batch's size) until it is folded into its buckets, which only a read of `/metrics` or an
/// upkeep does: a server that nobody scrapes would hold them all, growing without end. A
/// thread of the process (the recorder is the process's) runs the upkeep every
/// [`UPKEEP_EVERY`], whatever runtime or server comes and goes.
fn spawn_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
                UPKEEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep: histograms are folded only when /metrics is read");
    }
}

/// The process-wide recorder; installed once, whatever number of servers the process runs.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("duration_seconds".into()),
                    LATENCY_BUCKETS,
                )
                .expect("bucket list is not empty")
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("command_batch_size".into()),
                    BATCH_BUCKETS,
                )
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program); then the
            // metrics go there and /metrics shows what this handle saw.
            let _ = metrics::set_global_recorder(recorder);
            spawn_upkeep(handle.clone());
            metrics::describe_counter!("http_requests_total", "HTTP requests answered");
            metrics::describe_histogram!(
                "http_request_duration_seconds",
                metrics::Unit::Seconds,
                "HTTP request latency"
            );
            metrics::describe_histogram!(
                "command_batch_size",
                "Groups of commands loaded, or written, in one statement"
            );
            metrics::describe_histogram!(
                "command_batch_duration_seconds",
                metrics::Unit::Seconds,
                "Time a batch of loads, or of writes, took until each of its groups was told"
            );
            metrics::describe_counter!(
                "db_connections_reused_total",
                "Commands that took a connection a command before them left clean"
            );
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorder_folds_its_histogram_samples_every_second_with_nobody_reading_metrics() {
        let handle = metrics_handle();
        let before = upkeeps();
        metrics::histogram!("http_request_duration_seconds", "route" => "test").record(0.001);
        let deadline = std::time::Instant::now() + UPKEEP_EVERY * 3;
        while upkeeps() == before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            upkeeps() > before,
            "no upkeep within {:?}",
            UPKEEP_EVERY * 3
        );
        // Folded samples still count: the next read shows the one recorded.
        assert!(
            handle
                .render()
                .contains("http_request_duration_seconds_count{route=\"test\"} 1"),
            "{}",
            handle.render()
        );
    }
}
