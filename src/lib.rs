//! leadledger: the event-sourced system of record for a sales-automation platform.
//!
//! A tour, from the outside in. Dependencies point one way — `http` and `cli` → `app` →
//! `store` / `projections` → `aggregates` — and `tests/api/layers.rs` keeps them so.
//! - [`cli`]: the `leadledger` command line; `serve` runs the HTTP API.
//! - [`http`]: the axum router (routes and DTOs, extractors, OpenAPI), its middleware, the
//!   server loop with graceful shutdown, and `http::error`, the one mapping from errors to
//!   HTTP status codes and problem+json bodies.
//! - [`app`]: the application layer every entry point shares: [`app::App`] (built once by
//!   `App::build`), command execution with idempotency and retries, and the services —
//!   contacts, enrollments, webhooks, budgets, analytics, API keys, background workers —
//!   whose failures are an `app::error::AppError`.
//! - [`providers`]: how each kind of webhook source authenticates a delivery and what
//!   its body says, as pure functions (no I/O) for the application layer to call.
//! - [`store`]: the event store (optimistic concurrency, snapshots, the global feed).
//! - [`db`]: the pool and migrations, on `DATABASE_URL` or on [`embedded`] PostgreSQL, a
//!   private cluster in the data directory run from the machine's binaries.
//! - [`backup`]: `backup` and `restore`, a logical dump in one snapshot with a manifest.
//! - [`secrets`]: the key that seals webhook-source secrets at rest.
//! - [`config`] and [`telemetry`]: settings from the environment, and logs and metrics.
//!
//! The domain lives in the `aggregates` crate, read models (and the runner that feeds them
//! and the reactors) in `projections`.

pub mod app;
pub mod backup;
pub mod cli;
pub mod config;
pub mod console;
pub mod db;
pub mod embedded;
pub mod http;
pub mod providers;
pub mod secrets;
pub mod store;
pub mod telemetry;

/// Locks `mutex`, also once a panic elsewhere has poisoned it: the values the crate keeps
/// behind a `std::sync::Mutex` (caches, queues, lists of streams and connections) are whole
/// between any two statements of their users, so a panic cannot leave one half-changed.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
