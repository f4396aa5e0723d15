//! The cluster proof: `scripts/cluster` (a PostgreSQL primary with a synchronous streaming
//! replica, three `leadledger serve` processes, HAProxy in front) under a bounded load of
//! idempotent writes through HAProxy. One process is killed with SIGKILL: every
//! acknowledged write is stored once, the projections move to a survivor, and reads through
//! the replica see their writes with `min_position`. Then the primary is stopped and the
//! replica promoted: the service goes on and nothing acknowledged is lost.
//!
//! Runs when HAProxy is installed (CI installs it); the figures it measures are printed
//! (`cargo test --test api cluster:: -- --nocapture`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::lifecycle::BIN;

struct Cluster {
    dir: PathBuf,
    env: HashMap<String, String>,
    key: String,
}

fn script(dir: &Path, command: &str) -> std::process::Output {
    std::process::Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster"))
        .arg(command)
        .env("CLUSTER_DIR", dir)
        .env("LEADLEDGER_BIN", BIN)
        .env_remove("DATABASE_URL")
        .env_remove("LEADLEDGER_READ_DATABASE_URL")
        .output()
        .expect("scripts/cluster runs")
}

impl Cluster {
    fn read_env(dir: &Path) -> HashMap<String, String> {
        std::fs::read_to_string(dir.join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn url(&self) -> &str {
        &self.env["URL"]
    }

    fn node_urls(&self) -> Vec<String> {
        (1..=3)
            .map(|n| format!("http://127.0.0.1:{}", self.env[&format!("NODE{n}_PORT")]))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = script(&self.dir, "down");
    }
}

fn have(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the writers saw.
#[derive(Default)]
struct Tally {
    /// email → position of its acknowledgement.
    acked: HashMap<String, String>,
    /// When each failed attempt (5xx, 409 in flight, or no answer) happened.
    failures: Vec<Instant>,
}

/// Writes contacts `from..to` through `url`, each with its own idempotency key, several at
/// once; a failed attempt is retried with the same key until it is acknowledged.
async fn write_load(
    url: String,
    key: String,
    prefix: &'static str,
    range: std::ops::Range<usize>,
    clients: usize,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) {
    let next = Arc::new(AtomicUsize::new(range.start));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, client, url, key, tally) = (
            next.clone(),
            client.clone(),
            url.clone(),
            key.clone(),
            tally.clone(),
        );
        let end = range.end;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end || stop.load(Ordering::Relaxed) {
                    return;
                }
                let email = format!("{prefix}-{i}@example.com");
                let deadline = Instant::now() + Duration::from_secs(90);
                loop {
                    assert!(Instant::now() < deadline, "{email} never acknowledged");
                    let sent = client
                        .post(format!("{url}/v1/contacts"))
                        .bearer_auth(&key)
                        .header("Idempotency-Key", format!("{prefix}-{i}"))
                        .json(&json!({"email": email, "first_name": "Load"}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            let body: Value = r.json().await.unwrap();
                            let position = body["position"].as_str().unwrap().to_string();
                            tally.lock().unwrap().acked.insert(email, position);
                            break;
                        }
                        Ok(r) if r.status().is_server_error() || r.status().as_u16() == 409 => {
                            tally.lock().unwrap().failures.push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Ok(r) => panic!("{email}: unexpected {}", r.status()),
                        Err(_) => {
                            tally.lock().unwrap().failures.push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The pids of the processes holding each projection's lock.
async fn holders(conn: &mut PgConnection) -> Vec<(String, u32)> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND a.application_name LIKE 'leadledger-projection:%'",
    )
    .fetch_all(conn)
    .await
    .unwrap();
    names
        .into_iter()
        .filter_map(|n| {
            let mut parts = n.rsplitn(2, ":pid");
            let pid = parts.next()?.parse().ok()?;
            let rest = parts.next()?.trim_start_matches("leadledger-projection:");
            Some((rest.to_string(), pid))
        })
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn contact_events(url: &str) -> (i64, i64) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let row: (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'contact'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_keeps_every_acknowledged_write_through_a_killed_process_and_a_promoted_replica()
{
    if !have("haproxy") || !have("curl") {
        eprintln!("skipped: HAProxy or curl is not installed (apt-get install haproxy curl)");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("leadledger-cluster-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = root.path().join("c");
    let started = Instant::now();
    let dir2 = dir.clone();
    let up = tokio::task::spawn_blocking(move || script(&dir2, "up"))
        .await
        .unwrap();
    let cluster = Cluster {
        env: if up.status.success() {
            Cluster::read_env(&dir)
        } else {
            HashMap::new()
        },
        key: std::fs::read_to_string(dir.join("admin.key"))
            .unwrap_or_default()
            .trim()
            .to_string(),
        dir: dir.clone(),
    };
    assert!(
        up.status.success(),
        "cluster up: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let up_secs = started.elapsed().as_secs_f64();
    let primary_url = cluster.env["DATABASE_URL"].clone();
    let replica_url = cluster.env["READ_DATABASE_URL"].clone();

    // Phase 1: a bounded load through HAProxy; the process running the projections is
    // killed with SIGKILL once a quarter of it is acknowledged.
    const WRITES: usize = 800;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let load_started = Instant::now();
    let load = tokio::spawn(write_load(
        cluster.url().to_string(),
        cluster.key.clone(),
        "kill",
        0..WRITES,
        8,
        tally.clone(),
        Arc::new(AtomicBool::new(false)),
    ));
    // The replica's lag, sampled from the processes' /metrics while the load runs.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (nodes, sampling) = (cluster.node_urls(), sampling.clone());
        tokio::spawn(async move {
            let (mut bytes, mut seconds) = (0f64, 0f64);
            let client = reqwest::Client::new();
            while sampling.load(Ordering::Relaxed) {
                for node in &nodes {
                    if let Ok(r) = client.get(format!("{node}/metrics")).send().await
                        && let Ok(text) = r.text().await
                    {
                        bytes = bytes.max(metric(&text, "leadledger_replica_lag_bytes"));
                        seconds = seconds.max(metric(&text, "leadledger_replica_lag_seconds"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (bytes, seconds)
        })
    };
    let mut primary = PgConnection::connect(&primary_url).await.unwrap();
    while tally.lock().unwrap().acked.len() < WRITES / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = holders(&mut primary).await;
    assert!(!before.is_empty(), "projections run somewhere");
    let victim = before[0].1;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    // The projections move to a surviving process.
    let moved = loop {
        let now = holders(&mut primary).await;
        // One row per projection lock: every lock is held again, none by the killed process.
        if now.iter().all(|(_, pid)| *pid != victim) && now.len() == before.len() {
            break now;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "projections still held by the killed process or by nobody: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let moved_after = killed_at.elapsed();
    load.await.unwrap();
    let load_secs = load_started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let (lag_bytes, lag_seconds) = sampler.await.unwrap();
    let (failed, recovered) = {
        let t = tally.lock().unwrap();
        let after_kill: Vec<&Instant> = t.failures.iter().filter(|f| **f >= killed_at).collect();
        let recovered = after_kill
            .iter()
            .map(|f| f.duration_since(killed_at))
            .max()
            .unwrap_or_default();
        (t.failures.len(), recovered)
    };
    assert_eq!(tally.lock().unwrap().acked.len(), WRITES);
    // Every acknowledged write is stored once: one event per contact, no more.
    assert_eq!(
        contact_events(&primary_url).await,
        (WRITES as i64, WRITES as i64)
    );

    // Reads through the replica see their writes with min_position.
    let client = reqwest::Client::new();
    let sample: Vec<(String, String)> = tally
        .lock()
        .unwrap()
        .acked
        .iter()
        .take(20)
        .map(|(e, p)| (e.clone(), p.clone()))
        .collect();
    for (email, position) in &sample {
        let page: Value = client
            .get(format!(
                "{}/v1/contacts?email={email}&min_position={position}",
                cluster.url()
            ))
            .bearer_auth(&cluster.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["items"][0]["email"], email.as_str(), "{page}");
    }
    let mut replica_reads = 0.0;
    for node in cluster.node_urls() {
        if let Ok(r) = client.get(format!("{node}/metrics")).send().await {
            replica_reads += metric(&r.text().await.unwrap(), "leadledger_replica_reads_total");
        }
    }
    assert!(replica_reads >= 20.0, "the reads went to the replica");
    let _ = primary.close().await;

    // Phase 2: the primary stops; the replica is promoted and the processes follow it,
    // while writes keep coming and retry, until 100 more are acknowledged after it.
    let phase2 = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(write_load(
        cluster.url().to_string(),
        cluster.key.clone(),
        "promote",
        0..usize::MAX,
        4,
        phase2.clone(),
        stop.clone(),
    ));
    while phase2.lock().unwrap().acked.len() < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover_started = Instant::now();
    let dir2 = dir.clone();
    let promoted = tokio::task::spawn_blocking(move || script(&dir2, "promote"))
        .await
        .unwrap();
    assert!(
        promoted.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    let failover_secs = failover_started.elapsed().as_secs_f64();
    let after_failover = phase2.lock().unwrap().acked.len();
    while phase2.lock().unwrap().acked.len() < after_failover + 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let more = phase2.lock().unwrap().acked.len();
    let (failed2, writes_down) = {
        let t = phase2.lock().unwrap();
        let first = t.failures.iter().min().copied();
        let last = t.failures.iter().max().copied();
        let window = match (first, last) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        };
        (t.failures.len(), window)
    };
    // On the promoted replica: everything acknowledged before and during the failover.
    assert_eq!(
        contact_events(&replica_url).await,
        ((WRITES + more) as i64, (WRITES + more) as i64),
        "nothing acknowledged was lost"
    );

    eprintln!(
        "cluster proof: up in {up_secs:.1} s; {WRITES} writes through HAProxy in {load_secs:.1} s \
         ({:.0}/s, debug build); SIGKILL of pid {victim}: {failed} failed attempts (all retried), \
         last failure {:.2} s after the kill, projections on a survivor after {:.2} s ({moved:?}); \
         replica lag under load ≤ {lag_bytes} bytes / {lag_seconds:.3} s; failover \
         (stop primary, promote, restart 3 processes) {failover_secs:.1} s, {failed2} failed \
         attempts over {:.1} s, all retried; {} writes acknowledged, none lost",
        WRITES as f64 / load_secs,
        recovered.as_secs_f64(),
        moved_after.as_secs_f64(),
        writes_down.as_secs_f64(),
        WRITES + more
    );
    drop(cluster);
}
