//! The `leadledger` binary as a process: embedded PostgreSQL across restarts and kills,
//! commands sharing a running instance, graceful shutdown with a request in flight.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User};
use sqlx::Connection;

use crate::helpers::harness;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_leadledger");

/// A data directory the unprivileged PostgreSQL user can reach (temp dirs are 0700 by
/// default; the data dir itself is made by leadledger).
pub(crate) fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let parent = tempfile::Builder::new()
        .prefix("leadledger-it-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = parent.path().join("data");
    (parent, dir)
}

pub(crate) fn leadledger(data: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .env("LEADLEDGER_DATA_DIR", data)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

pub(crate) struct Server {
    child: Child,
    pub(crate) address: String,
    /// Everything the process printed, stdout and stderr.
    output: Arc<Mutex<String>>,
}

/// Starts `serve` on port 0 and waits for the line that says where it listens.
pub(crate) fn serve(mut cmd: Command) -> Server {
    let mut child = cmd
        .args(["serve", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let output = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let out = output.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("leadledger listening on ") {
                let _ = tx.send(addr.to_string());
            }
            out.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    let stderr = child.stderr.take().unwrap();
    let err = output.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            err.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    let address = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("serve printed its address");
    Server {
        child,
        address,
        output,
    }
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    pub(crate) fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "serve did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    /// A test that fails midway must not leave its server running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn ready(address: &str) -> u16 {
    reqwest::get(format!("{address}/health/ready"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

pub(crate) fn postgres_is_running(data: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(data.join("pg/postmaster.pid")) else {
        return false;
    };
    let pid: i32 = text.lines().next().unwrap().trim().parse().unwrap();
    kill(Pid::from_raw(pid), None).is_ok()
}

pub(crate) fn db_url(data: &Path) -> String {
    let out = leadledger(data).args(["db", "url"]).output().unwrap();
    assert!(
        out.status.success(),
        "db url: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn serve_on_its_embedded_database_keeps_data_across_restarts() {
    let (_keep, data) = data_dir();
    let server = serve(leadledger(&data));
    assert_eq!(ready(&server.address).await, 200);

    // A second command on the same data dir uses the running instance and leaves it running.
    let url = db_url(&data);
    assert!(postgres_is_running(&data));
    assert_eq!(ready(&server.address).await, 200);

    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE restart_probe (note text)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO restart_probe VALUES ('written before the restart')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    server.signal(Signal::SIGTERM);
    assert!(server.wait().success(), "serve exits cleanly on SIGTERM");
    assert!(
        !postgres_is_running(&data),
        "the embedded PostgreSQL is stopped with the service"
    );

    let server = serve(leadledger(&data));
    assert_eq!(ready(&server.address).await, 200);
    let mut conn = sqlx::PgConnection::connect(&db_url(&data)).await.unwrap();
    let note: String = sqlx::query_scalar("SELECT note FROM restart_probe")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(note, "written before the restart");
    conn.close().await.unwrap();
    server.signal(Signal::SIGINT);
    assert!(server.wait().success(), "serve exits cleanly on Ctrl-C");
    assert!(!postgres_is_running(&data));
}

#[tokio::test]
async fn serve_adopts_the_postgres_left_running_by_a_killed_serve() {
    let (_keep, data) = data_dir();
    let server = serve(leadledger(&data));
    assert_eq!(ready(&server.address).await, 200);
    server.signal(Signal::SIGKILL);
    server.wait();
    assert!(
        postgres_is_running(&data),
        "SIGKILL leaves PostgreSQL behind"
    );

    let server = serve(leadledger(&data));
    assert_eq!(ready(&server.address).await, 200);
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
    assert!(!postgres_is_running(&data), "the adopting serve stops it");
}

#[tokio::test]
async fn a_command_without_serve_starts_postgres_and_stops_it_again() {
    let (_keep, data) = data_dir();
    let out = leadledger(&data).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
    assert!(!postgres_is_running(&data));
    assert!(data.join("pg/PG_VERSION").exists());
}

#[tokio::test]
async fn a_request_in_flight_when_sigterm_arrives_still_completes() {
    let harness = harness();
    let database = harness.fresh_database().await;
    let url = harness.url(&database);
    let (_keep, data) = data_dir();
    let mut cmd = leadledger(&data);
    cmd.env("DATABASE_URL", &url);
    let server = serve(cmd);
    assert_eq!(ready(&server.address).await, 200);

    // Hold a lock the readiness check needs: its request stays in flight until released.
    let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let in_flight = tokio::spawn(ready_owned(server.address.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!in_flight.is_finished(), "the request is held by the lock");

    server.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // New connections are refused while the old request is still being served.
    let refused = reqwest::get(format!("{}/health/live", server.address)).await;
    assert!(refused.is_err(), "no new connections after SIGTERM");
    assert!(!in_flight.is_finished());

    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request completed"
    );
    assert!(server.wait().success());
    blocker.close().await.unwrap();
    harness.drop_database(database);
}

async fn ready_owned(address: String) -> u16 {
    ready(&address).await
}

#[tokio::test]
async fn serve_runs_as_an_unprivileged_user_too() {
    let (_keep, data) = data_dir();
    let mut cmd = leadledger(&data);
    if Uid::effective().is_root() {
        let user = User::from_name("postgres")
            .unwrap()
            .expect("a postgres user");
        std::fs::create_dir_all(&data).unwrap();
        nix::unistd::chown(&data, Some(user.uid), Some(user.gid)).unwrap();
        // The build directory may be out of that user's reach; run a copy from beside the data.
        let bin = data.parent().unwrap().join("leadledger");
        std::fs::copy(BIN, &bin).unwrap();
        cmd = Command::new(&bin);
        cmd.env_remove("DATABASE_URL")
            .env("LEADLEDGER_DATA_DIR", &data)
            .stdin(Stdio::null())
            .uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .current_dir(&data);
    }
    let server = serve(cmd);
    assert_eq!(ready(&server.address).await, 200);
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
    assert!(!postgres_is_running(&data));
}

#[tokio::test]
async fn a_data_dir_postgres_cannot_reach_is_a_clear_error() {
    if !Uid::effective().is_root() {
        // Only root runs PostgreSQL as another user; as that user everything is reachable.
        return;
    }
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = private.path().join("data");
    let out = leadledger(&data).arg("migrate").output().unwrap();
    assert!(
        !out.status.success(),
        "stdout: {} stderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(stderr.contains("LEADLEDGER_DATA_DIR"), "{stderr}");
}

#[tokio::test]
async fn the_first_serve_writes_a_private_admin_key_and_never_prints_it() {
    let (_keep, data) = data_dir();
    let server = serve(leadledger(&data));
    let path = data.join("admin.key");
    let key = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert!(key.starts_with("ll_"));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let client = reqwest::Client::new();
    let list = client
        .get(format!("{}/v1/campaigns", server.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status().as_u16(), 200);
    let created = client
        .post(format!("{}/v1/campaigns", server.address))
        .bearer_auth(&key)
        .json(&serde_json::json!({"name": "kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let created: serde_json::Value = created.json().await.unwrap();
    server.signal(Signal::SIGTERM);
    let output = server.output.clone();
    assert!(server.wait().success());
    let printed = output.lock().unwrap().clone();
    assert!(
        printed.contains(&path.display().to_string()),
        "the path is printed: {printed}"
    );
    assert!(
        !printed.contains(&key),
        "the key itself is never printed or logged"
    );

    // A restart writes no new key; the first one still works, and so does the data.
    let server = serve(leadledger(&data));
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), key);
    let list: serde_json::Value = client
        .get(format!(
            "{}/v1/campaigns?min_position={}",
            server.address,
            created["position"].as_str().unwrap()
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"][0]["id"], created["id"], "{list}");
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_from_the_command_line() {
    let (_keep, data) = data_dir();
    let server = serve(leadledger(&data));
    let out = leadledger(&data)
        .args(["keys", "create", "--name", "reporting", "--scope", "read"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_string();
    assert!(
        key.starts_with("ll_"),
        "the key alone on the last line: {stdout}"
    );
    let client = reqwest::Client::new();
    let get = |k: String| {
        let client = client.clone();
        let url = format!("{}/v1/campaigns", server.address);
        async move {
            client
                .get(url)
                .bearer_auth(k)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(key.clone()).await, 200);
    let post = client
        .post(format!("{}/v1/campaigns", server.address))
        .bearer_auth(&key)
        .json(&serde_json::json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 403, "a read key cannot write");

    let list = leadledger(&data).args(["keys", "list"]).output().unwrap();
    let listed = String::from_utf8(list.stdout).unwrap();
    let line = listed
        .lines()
        .find(|l| l.contains("reporting"))
        .expect("listed");
    assert!(!listed.contains(&key), "the list never shows a key");
    let id = line.split_whitespace().next().unwrap();
    let revoke = leadledger(&data)
        .args(["keys", "revoke", id])
        .output()
        .unwrap();
    assert!(revoke.status.success());
    assert_eq!(get(key).await, 401);
    let again = leadledger(&data)
        .args(["keys", "revoke", id])
        .output()
        .unwrap();
    assert!(!again.status.success(), "revoking twice is an error");

    let status = leadledger(&data)
        .args(["projections", "status", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status[0]["name"], "campaigns");
    let names: Vec<&str> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"webhook_parking"),
        "reactors are listed too: {names:?}"
    );
    assert!(
        status[0]["held_by"]
            .as_str()
            .unwrap_or("")
            .contains("leadledger-projection"),
        "{status}"
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
}

#[tokio::test]
async fn a_client_still_sending_its_headers_does_not_hold_shutdown() {
    use tokio::io::AsyncWriteExt;
    let harness = harness();
    let database = harness.fresh_database().await;
    let (_keep, data) = data_dir();
    let mut cmd = leadledger(&data);
    cmd.env("DATABASE_URL", harness.url(&database));
    let server = serve(cmd);
    assert_eq!(ready(&server.address).await, 200);
    let addr = server.address.trim_start_matches("http://").to_string();
    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = std::time::Instant::now();
    server.signal(Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert!(status.success());
    // Neither the 20 s grace nor the 10 s header timeout: no request was in flight.
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        signalled.elapsed()
    );
    drop((partial, idle));
    harness.drop_database(database);
}
