//! Reads through a real streaming replica (`LEADLEDGER_READ_DATABASE_URL`): a primary and a
//! `pg_basebackup` standby from the machine's binaries. Lists are served by the replica,
//! `min_position` gives read-your-writes through it, and a replica that is stopped or
//! behind leaves the reads to the primary, counted in `/metrics`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use leadledger::app::keys::{self, Scope};
use leadledger::app::workers;
use leadledger::http;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::helpers::build_app;

/// A primary and its streaming standby, each on its own Unix socket; stopped and removed
/// when dropped.
pub(crate) struct PgPair {
    root: tempfile::TempDir,
    bindir: PathBuf,
    user: Option<nix::unistd::User>,
}

impl PgPair {
    pub(crate) async fn start() -> Self {
        let bindir = leadledger::embedded::server_bindir().await.unwrap();
        let root = tempfile::Builder::new()
            .prefix("leadledger-pair-")
            .tempdir()
            .unwrap();
        let user = if nix::unistd::Uid::effective().is_root() {
            nix::unistd::User::from_name("postgres").unwrap()
        } else {
            None
        };
        if let Some(u) = &user {
            nix::unistd::chown(root.path(), Some(u.uid), Some(u.gid)).unwrap();
        }
        let pair = Self { root, bindir, user };
        for dir in ["primary.sock", "replica.sock"] {
            pair.run("mkdir", &["-m", "0700", pair.path(dir).to_str().unwrap()]);
        }
        let primary = pair.path("primary");
        pair.tool(
            "initdb",
            &[
                "-D",
                primary.to_str().unwrap(),
                "-U",
                "leadledger",
                "--auth=trust",
                "--no-instructions",
            ],
        );
        pair.pg_ctl("primary", &[]);
        pair.tool(
            "createdb",
            &[
                "-h",
                pair.path("primary.sock").to_str().unwrap(),
                "-U",
                "leadledger",
                "leadledger",
            ],
        );
        pair.tool(
            "pg_basebackup",
            &[
                "-D",
                pair.path("replica").to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                pair.path("primary.sock").to_str().unwrap(),
                "-U",
                "leadledger",
            ],
        );
        pair.pg_ctl("replica", &[]);
        pair
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn run(&self, program: &str, args: &[&str]) {
        let mut cmd = Command::new(program);
        cmd.args(args).env("LC_ALL", "C").env_remove("PGDATA");
        if let Some(u) = &self.user {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tool(&self, name: &str, args: &[&str]) {
        self.run(self.bindir.join(name).to_str().unwrap(), args);
    }

    fn pg_ctl(&self, node: &str, extra: &[&str]) {
        let data = self.path(node);
        let log = self.path(&format!("{node}.log"));
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -c fsync=off -c wal_level=replica",
            self.path(&format!("{node}.sock")).display()
        );
        let mut args = vec![
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-o",
            &options,
            "start",
        ];
        args.extend_from_slice(extra);
        self.tool("pg_ctl", &args);
    }

    pub(crate) fn stop_replica(&self) {
        let data = self.path("replica");
        self.tool(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub(crate) fn options(&self, node: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(self.path(&format!("{node}.sock")))
            .username("leadledger")
            .database("leadledger")
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for node in ["replica", "primary"] {
            let data = self.path(node);
            if data.join("postmaster.pid").exists() {
                let mut cmd = Command::new(self.bindir.join("pg_ctl"));
                cmd.args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"]);
                if let Some(u) = &self.user {
                    cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
                }
                let _ = cmd.output();
            }
        }
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Served {
    address: String,
    key: String,
    stop: CancellationToken,
    workers: workers::Workers,
}

async fn serve_on(primary: PgPool, replica: PgPool) -> Served {
    let state = build_app(primary.clone()).with_replica(replica);
    let workers = workers::start(&state);
    let (_, key) = keys::create_key(&primary, "replica test", Scope::Admin)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(http::serve_with(
        listener,
        http::router(state),
        async move { token.cancelled().await },
        http::ServeOptions::default(),
    ));
    Served {
        address,
        key,
        stop,
        workers,
    }
}

async fn get(client: &reqwest::Client, s: &Served, path: &str) -> (u16, Value) {
    let r = client
        .get(format!("{}{path}", s.address))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn metrics(client: &reqwest::Client, s: &Served) -> String {
    client
        .get(format!("{}/metrics", s.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn emails(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|c| c["email"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_see_their_writes_and_fall_back_when_it_is_behind_or_down() {
    let pair = PgPair::start().await;
    let primary = leadledger::db::pool_options(10)
        .connect_with(pair.options("primary"))
        .await
        .unwrap();
    leadledger::db::MIGRATOR.run(&primary).await.unwrap();
    let replica = leadledger::app::replica::pool_options(10)
        .connect_lazy_with(pair.options("replica").application_name("test-read"));
    let served = serve_on(primary.clone(), replica.clone()).await;
    let client = reqwest::Client::new();
    let before = metrics(&client, &served).await;

    // Read-your-writes through the replica.
    for i in 0..5 {
        let written: Value = client
            .post(format!("{}/v1/contacts", served.address))
            .bearer_auth(&served.key)
            .json(&json!({"email": format!("r{i}@example.com")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let position = written["position"].as_str().unwrap();
        let (status, page) = get(
            &client,
            &served,
            &format!("/v1/contacts?min_position={position}"),
        )
        .await;
        assert_eq!(status, 200);
        assert!(emails(&page).contains(&format!("r{i}@example.com")));
    }
    let after = metrics(&client, &served).await;
    assert!(
        metric(&after, "leadledger_replica_reads_total")
            >= metric(&before, "leadledger_replica_reads_total") + 5.0,
        "the reads went to the replica:\n{after}"
    );
    assert_eq!(
        metric(&after, "leadledger_replica_fallbacks_total"),
        metric(&before, "leadledger_replica_fallbacks_total"),
        "no read fell back while the replica kept up"
    );

    // With replay paused, the replica serves what it has: a list without min_position
    // misses the new write (it was read there), one with it waits, then takes the primary.
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&replica)
        .await
        .unwrap();
    let written: Value = client
        .post(format!("{}/v1/contacts", served.address))
        .bearer_auth(&served.key)
        .json(&json!({"email": "paused@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let position = written["position"].as_str().unwrap().to_string();
    // Let the primary's read model take the write.
    let (_, page) = get(
        &client,
        &served,
        &format!("/v1/contacts?min_position={position}"),
    )
    .await;
    assert!(emails(&page).contains(&"paused@example.com".to_string()));
    let (_, stale) = get(&client, &served, "/v1/contacts").await;
    assert!(
        !emails(&stale).contains(&"paused@example.com".to_string()),
        "a plain list is served by the (paused) replica"
    );
    let behind = metrics(&client, &served).await;
    assert!(
        metric(
            &behind,
            "leadledger_replica_fallbacks_total{reason=\"behind\"}"
        ) >= metric(
            &before,
            "leadledger_replica_fallbacks_total{reason=\"behind\"}"
        ) + 1.0,
        "{behind}"
    );
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&replica)
        .await
        .unwrap();

    // Stopped: reads go to the primary at once, and the replica is reported down.
    pair.stop_replica();
    let started = Instant::now();
    let (status, page) = get(
        &client,
        &served,
        &format!("/v1/contacts?min_position={position}"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(emails(&page).contains(&"paused@example.com".to_string()));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a down replica does not hold the read: {:?}",
        started.elapsed()
    );
    for _ in 0..5 {
        let (status, _) = get(&client, &served, "/v1/contacts").await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let down = metrics(&client, &served).await;
    assert!(
        metric(&down, "leadledger_replica_fallbacks_total{reason=\"down\"}")
            >= metric(
                &before,
                "leadledger_replica_fallbacks_total{reason=\"down\"}"
            ) + 1.0,
        "{down}"
    );
    assert!(down.contains("leadledger_replica_up 0"), "{down}");
    assert!(down.contains("leadledger_replica_lag_seconds"), "{down}");

    served.stop.cancel();
    served.workers.stop().await;
    primary.close().await;
    drop(pair);
}
