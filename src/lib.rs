//! leadledger: the event-sourced system of record for a sales-automation platform.
//!
//! A tour, from the outside in:
//! - [`cli`]: the `leadledger` command line; `serve` runs the HTTP API.
//! - [`http`]: the axum router, its middleware, and the server loop with graceful shutdown.
//! - [`error`]: the one mapping from errors to HTTP status codes and problem+json bodies.
//! - [`db`]: the pool and migrations, on `DATABASE_URL` or on [`embedded`] PostgreSQL, a
//!   private cluster in the data directory run from the machine's binaries.
//! - [`config`] and [`telemetry`]: settings from the environment, and logs.
//!
//! The domain lives in the `aggregates` crate, read models in `projections`.

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod embedded;
pub mod error;
pub mod http;
pub mod secrets;
pub mod store;
pub mod telemetry;
