//! The floor: the SQL that one contact upsert costs, run by `pgbench` against the same
//! PostgreSQL server as the server under test, at the same concurrency.
//!
//! One transaction is what a command does in the database, without the server: load the
//! stream (`SELECT` from `events` by aggregate), insert the event row, insert the
//! idempotency record, commit. The rows carry exactly the bytes the server wrote for a
//! real upsert (its event payload and metadata, its recorded response), bound as
//! parameters of prepared statements, as sqlx sends them.
//!
//! It runs on two databases:
//! - a quiet one (`leadledger_floor`), migrated like the server's (same tables, indexes and
//!   NOTIFY trigger) but with no server attached: the SQL alone;
//! - the server's own, where every commit also wakes the server's projection runners as
//!   the server's commands do (they read these rows and move their checkpoints; no read
//!   model applies them: they belong to a stream type of their own, `bench_floor`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use leadledger::app::keys::{self, Scope};
use serde_json::Value;
use tokio::process::Command;
use uuid::Uuid;

use crate::Server;
use crate::measure::percentile;

const SCRIPT: &str = r"\set id random(1, 9000000000000000000)
BEGIN;
SELECT sequence, event_type, event_version, payload, metadata, position, transaction_id::text
  FROM events WHERE aggregate_type = 'bench_floor' AND aggregate_id = 'floor-' || :id
  ORDER BY sequence;
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
  VALUES ('bench_floor', 'floor-' || :id, 1, 'ContactCreated', '1.0', :payload, :metadata)
  RETURNING position, transaction_id::text;
INSERT INTO idempotency_records
    (api_key_id, idempotency_key, request_hash, response_status, response_body, response_headers)
  VALUES (:api_key, 'floor-' || :id, :request_hash, 201, :response_body, :response_headers);
END;
";

pub const QUIET_DATABASE: &str = "leadledger_floor";

/// `pgbench`, its script and the values it binds.
pub struct Floor {
    pgbench: PathBuf,
    dir: PathBuf,
    script: PathBuf,
    /// `-h -p -U`, from the server's pool.
    connection: Vec<String>,
    /// `-D name=value` for the script's variables but the API key's.
    defines: Vec<String>,
}

/// A database to run the floor on, with the API key its idempotency records belong to.
pub struct Target {
    database: String,
    api_key: Uuid,
}

impl Target {
    /// The server's own database.
    pub fn server(server: &Server) -> Self {
        Self {
            database: server
                .pool
                .connect_options()
                .get_database()
                .unwrap_or(leadledger::embedded::DATABASE_NAME)
                .to_string(),
            api_key: server.key_id,
        }
    }

    /// A new database on the server's PostgreSQL, migrated like the server's, that no
    /// server uses.
    pub async fn quiet(server: &Server) -> anyhow::Result<Self> {
        // Identifiers cannot be bound; this one is a constant.
        sqlx::query("CREATE DATABASE leadledger_floor")
            .execute(&server.pool)
            .await?;
        let options = (*server.pool.connect_options())
            .clone()
            .database(QUIET_DATABASE);
        let pool = leadledger::db::pool_options(2)
            .connect_with(options)
            .await?;
        leadledger::db::MIGRATOR.run(&pool).await?;
        let (api_key, _) = keys::create_key(&pool, "floor", Scope::Write).await?;
        pool.close().await;
        Ok(Self {
            database: QUIET_DATABASE.to_string(),
            api_key,
        })
    }
}

/// What one pgbench run measured.
pub struct FloorRun {
    /// Transactions per second, without connection time (pgbench's own figure).
    pub tps: f64,
    /// Per transaction, sorted (from pgbench's transaction log).
    pub latencies: Vec<Duration>,
}

impl FloorRun {
    pub fn p50(&self) -> Duration {
        percentile(&self.latencies, 0.5)
    }

    pub fn p99(&self) -> Duration {
        percentile(&self.latencies, 0.99)
    }
}

impl Floor {
    /// Finds pgbench, upserts one contact through the server to take the bytes it writes,
    /// and writes the script into `dir`.
    pub async fn prepare(server: &Arc<Server>, dir: &Path) -> anyhow::Result<Self> {
        let pgbench = find_pgbench().await?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let script = dir.join("floor.sql");
        std::fs::write(&script, SCRIPT)?;

        let sample: Value = server
            .client
            .post(format!("{}/v1/contacts", server.address))
            .bearer_auth(&server.key)
            .header("idempotency-key", "floor-sample")
            .json(&crate::contacts::body("floor-sample", 0))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = sample["id"].as_str().context("id")?;
        let (payload, metadata): (String, String) = sqlx::query_as(
            "SELECT payload::text, metadata::text FROM events
             WHERE aggregate_type = 'contact' AND aggregate_id = $1 AND sequence = 1",
        )
        .bind(id)
        .fetch_one(&server.pool)
        .await?;
        let (request_hash, response_body, response_headers): (String, String, String) =
            sqlx::query_as(
                "SELECT encode(request_hash, 'hex'), encode(response_body, 'hex'), response_headers::text
                 FROM idempotency_records WHERE api_key_id = $1 AND idempotency_key = 'floor-sample'",
            )
            .bind(server.key_id)
            .fetch_one(&server.pool)
            .await?;
        let defines = [
            ("payload", payload),
            ("metadata", metadata),
            ("request_hash", format!("\\x{request_hash}")),
            ("response_body", format!("\\x{response_body}")),
            ("response_headers", response_headers),
        ]
        .into_iter()
        .map(|(k, v)| format!("--define={k}={v}"))
        .collect();

        let options = server.pool.connect_options();
        let host = options
            .get_socket()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| options.get_host().to_string());
        let connection = vec![
            format!("--host={host}"),
            format!("--port={}", options.get_port()),
            format!("--username={}", options.get_username()),
        ];
        Ok(Self {
            pgbench,
            dir: dir.to_path_buf(),
            script,
            connection,
            defines,
        })
    }

    /// `pgbench -n -M prepared -c N -j N -T secs -f floor.sql`, with a transaction log for
    /// the latency percentiles.
    pub async fn run(
        &self,
        target: &Target,
        clients: usize,
        duration: Duration,
    ) -> anyhow::Result<FloorRun> {
        let seconds = duration.as_secs_f64().round().max(1.0) as u64;
        let prefix = format!("txlog-{clients}-{}", unique());
        let output = Command::new(&self.pgbench)
            .args(&self.connection)
            .arg("--no-vacuum")
            .arg("--protocol=prepared")
            .arg(format!("--client={clients}"))
            .arg(format!("--jobs={clients}"))
            .arg(format!("--time={seconds}"))
            .arg(format!("--file={}", self.script.display()))
            .arg("--log")
            .arg(format!("--log-prefix={}", self.dir.join(&prefix).display()))
            .args(&self.defines)
            .arg(format!("--define=api_key={}", target.api_key))
            .arg(&target.database)
            .env("PGAPPNAME", "leadledger-bench-floor")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", self.pgbench.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        anyhow::ensure!(
            output.status.success(),
            "pgbench failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        let tps = stdout
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .with_context(|| format!("no tps in pgbench's output:\n{stdout}"))?;
        let failed = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions: "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        anyhow::ensure!(
            failed == 0,
            "pgbench: {failed} failed transactions:\n{stdout}"
        );
        let latencies = self.read_logs(&prefix)?;
        Ok(FloorRun { tps, latencies })
    }

    /// Reads and removes the transaction logs (`client transaction latency_us ...` per line).
    fn read_logs(&self, prefix: &str) -> anyhow::Result<Vec<Duration>> {
        let mut latencies = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.starts_with(&format!("{prefix}.")) {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            for line in text.lines() {
                if let Some(us) = line
                    .split_whitespace()
                    .nth(2)
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    latencies.push(Duration::from_micros(us));
                }
            }
            std::fs::remove_file(&path)?;
        }
        latencies.sort_unstable();
        Ok(latencies)
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// `pg_config --bindir`, then the newest `/usr/lib/postgresql/<version>/bin`, then `PATH`:
/// the order the embedded PostgreSQL finds its binaries in.
async fn find_pgbench() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output().await
        && out.status.success()
    {
        let candidate = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("pgbench");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin/pgbench")))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    versions.sort();
    if let Some((_, path)) = versions.pop() {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("pgbench"))
                .find(|p| p.is_file())
        })
        .context("pgbench not found (looked at `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH); install the PostgreSQL client tools")
}
