//! Logging: `tracing` to stderr, pretty or JSON, filtered by `RUST_LOG`.
//!
//! Log lines carry routes, ids and counts; never emails, names, phone numbers, API keys or
//! webhook secrets.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Pretty => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_target(false))
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
