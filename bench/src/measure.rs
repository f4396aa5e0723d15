//! The measuring code every benchmark shares: closed-loop clients for a fixed time, and
//! what they measured (throughput, latency percentiles, failures).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one operation of a client came to.
pub enum Outcome {
    /// Done; it did this many units of work (events in a webhook batch, else 1).
    Done(u64),
    /// Answered, but not as expected (a status code, an error message).
    Failed(String),
}

/// What clients measured over one timed window.
#[derive(Debug, Clone)]
pub struct Measured {
    pub clients: usize,
    pub elapsed: Duration,
    /// Latency of every successful operation, sorted.
    pub latencies: Vec<Duration>,
    /// Units of work done by the successful operations.
    pub units: u64,
    /// Operations that were answered but failed, by what went wrong.
    pub failures: Vec<String>,
}

impl Measured {
    pub fn ops(&self) -> usize {
        self.latencies.len()
    }

    /// Successful operations per second.
    pub fn per_second(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    /// Units of work per second (events/s for webhook batches).
    pub fn units_per_second(&self) -> f64 {
        self.units as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    pub fn p50(&self) -> Duration {
        percentile(&self.latencies, 0.5)
    }

    pub fn p99(&self) -> Duration {
        percentile(&self.latencies, 0.99)
    }

    pub fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }

    /// The failures as "n (kinds)", or "0".
    pub fn failures_summary(&self) -> String {
        if self.failures.is_empty() {
            return "0".to_string();
        }
        let mut kinds = self.failures.clone();
        kinds.sort_unstable();
        kinds.dedup();
        format!("{} ({})", self.failures.len(), kinds.join(", "))
    }
}

/// Runs `clients` concurrent clients, each sending its next operation as soon as the last
/// one is answered, until `duration` has passed. `op` gets the client's index. An
/// operation's error (a transport failure, a bug) stops the measurement.
pub async fn closed_loop<F, Fut>(
    clients: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<Measured>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Outcome>> + Send + 'static,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut units = 0;
                let mut failures = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match op(client).await? {
                        Outcome::Done(n) => {
                            latencies.push(sent.elapsed());
                            units += n;
                        }
                        Outcome::Failed(why) => failures.push(why),
                    }
                }
                anyhow::Ok((latencies, units, failures))
            })
        })
        .collect();
    let mut measured = Measured {
        clients,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        units: 0,
        failures: Vec::new(),
    };
    for task in tasks {
        let (latencies, units, failures) = task.await??;
        measured.latencies.extend(latencies);
        measured.units += units;
        measured.failures.extend(failures);
    }
    measured.elapsed = started.elapsed();
    measured.latencies.sort_unstable();
    Ok(measured)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
