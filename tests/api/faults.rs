//! Faults with real processes on a real PostgreSQL: `serve` killed with SIGKILL while
//! clients write, its PostgreSQL crashing or restarting under load, and one of two servers
//! sharing a database killed. Every write carries an `Idempotency-Key` and is retried with
//! it until answered; afterwards every write is stored exactly once and the read models
//! agree with the event log.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::lifecycle::{data_dir, db_url, leadledger, postgres_is_running, serve};

/// Concurrent clients in each test.
const CLIENTS: usize = 4;
/// How long any single request may take, outage or not, before it counts as a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// A data directory whose embedded PostgreSQL is stopped when the test ends, however it
/// ends: a `serve` killed with SIGKILL leaves it running.
pub(crate) struct DataDir {
    pub(crate) path: PathBuf,
    _parent: tempfile::TempDir,
}

impl DataDir {
    pub(crate) fn new() -> Self {
        let (parent, path) = data_dir();
        Self {
            path,
            _parent: parent,
        }
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let Some(pid) = postmaster_pid(&self.path) else {
            return;
        };
        // SIGINT: PostgreSQL's fast shutdown.
        if kill(pid, Signal::SIGINT).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while kill(pid, None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn postmaster_pid(data: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(data.join("pg/postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    Some(Pid::from_raw(pid))
}

pub(crate) fn admin_key(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.key"))
        .expect("serve wrote the admin key")
        .trim()
        .to_string()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(ANSWER_WITHIN)
        .build()
        .expect("http client")
}

/// One idempotent write: what a client sends, and sends again unchanged when it got no
/// answer.
#[derive(Debug, Clone)]
struct Write {
    path: String,
    body: Value,
    key: String,
}

impl Write {
    fn new(path: impl Into<String>, body: Value, key: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            body,
            key: key.into(),
        }
    }

    fn is_contact(&self) -> bool {
        self.path == "/v1/contacts"
    }

    fn is_campaign(&self) -> bool {
        self.path == "/v1/campaigns"
    }
}

#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    content_type: String,
    retry_after: Option<String>,
    replayed: bool,
    body: Value,
    took: Duration,
}

impl Answer {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// 503 as the API promises: problem+json with a `Retry-After` of whole seconds.
    fn assert_unavailable_problem(&self, what: &str) {
        assert_eq!(self.status, 503, "{what}: {self:?}");
        assert_eq!(
            self.content_type, "application/problem+json",
            "{what}: {self:?}"
        );
        assert_eq!(self.body["status"], 503, "{what}: {self:?}");
        assert!(
            self.retry_after
                .as_deref()
                .is_some_and(|v| v.parse::<u64>().is_ok()),
            "{what}: a 503 carries Retry-After: {self:?}"
        );
    }

    /// A write may be retried later with its key: the database was unreachable, or the
    /// same key is still held by a transaction of a process that just died.
    fn is_retryable(&self) -> bool {
        self.status == 503
            || (self.status == 409
                && self.body["type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("idempotency-key-in-flight")))
    }
}

async fn request(builder: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let started = Instant::now();
    let response = builder.send().await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let status = response.status().as_u16();
    let content_type = header("content-type").unwrap_or_default();
    let retry_after = header("retry-after");
    let replayed = header("idempotent-replayed").as_deref() == Some("true");
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer {
        status,
        content_type,
        retry_after,
        replayed,
        body,
        took: started.elapsed(),
    })
}

async fn send(
    client: &reqwest::Client,
    address: &str,
    api_key: &str,
    write: &Write,
) -> Result<Answer, reqwest::Error> {
    let builder = client
        .post(format!("{address}{}", write.path))
        .bearer_auth(api_key)
        .header("Idempotency-Key", &write.key)
        .json(&write.body);
    request(builder).await
}

async fn get(
    client: &reqwest::Client,
    address: &str,
    api_key: &str,
    path: &str,
) -> Result<Answer, reqwest::Error> {
    let builder = client.get(format!("{address}{path}")).bearer_auth(api_key);
    request(builder).await
}

/// Sends `write` until it is acknowledged, as a client with a retry policy would: no
/// answer, 503 and a key still in flight are retried with the same key and body.
async fn send_until_acknowledged(
    client: &reqwest::Client,
    address: &str,
    api_key: &str,
    write: &Write,
) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match send(client, address, api_key, write).await {
            Ok(answer) if answer.is_success() => return answer,
            Ok(answer) if answer.is_retryable() => {
                if answer.status == 503 {
                    answer.assert_unavailable_problem(&write.path);
                }
            }
            Ok(answer) => panic!("{write:?} answered {answer:?}"),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "{write:?} was not acknowledged within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `check` every 100 ms until it returns `Some`, failing after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(client: &reqwest::Client, address: &str) -> Option<Answer> {
    request(client.get(format!("{address}/health/ready")))
        .await
        .ok()
}

/// Runs a `leadledger` command to completion without blocking the test's runtime.
async fn run(cmd: Command) -> std::process::Output {
    tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("leadledger runs")
}

/// `leadledger projections status --format json` through `cmd`.
async fn projection_status(mut cmd: Command) -> Vec<Value> {
    cmd.args(["projections", "status", "--format", "json"]);
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "projections status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).expect("status is JSON");
    status.as_array().expect("a list of projections").clone()
}

/// Waits until every projection (and reactor) is applied by the process `pid`, with no
/// failure and no event left to apply.
async fn wait_until_caught_up_by(make: impl Fn() -> Command, pid: u32, within: Duration) {
    let suffix = format!(":pid{pid}");
    let deadline = Instant::now() + within;
    loop {
        let last = projection_status(make()).await;
        let done = !last.is_empty()
            && last.iter().all(|p| {
                p["state"] == "running"
                    && p["behind"] == 0
                    && p["held_by"].as_str().is_some_and(|h| h.ends_with(&suffix))
            });
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projections not all caught up by pid {pid} within {within:?}: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The read models equal what rebuilding them from the event log makes:
/// `leadledger projections rebuild --all --verify` exits 0, or prints the differences.
async fn assert_read_models_equal_a_rebuild(data: &Path) {
    let mut cmd = leadledger(data);
    cmd.args(["projections", "rebuild", "--all", "--verify"]);
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "the read models differ from a rebuild ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each row of `view` counts the events applied to it (`version`): it must equal the
/// length of its stream, for every stream of `aggregate_type` and no other row. An event
/// applied twice, or lost, shows here.
async fn assert_versions_match_streams(conn: &mut PgConnection, view: &str, aggregate_type: &str) {
    // Test-only SQL: `view` is one of this file's constants.
    let sql = format!(
        "SELECT coalesce(e.aggregate_id, v.id::text), e.events, v.version
         FROM (SELECT aggregate_id, count(*) AS events FROM events
               WHERE aggregate_type = $1 GROUP BY aggregate_id) e
         FULL JOIN {view} v ON v.id::text = e.aggregate_id
         WHERE e.events IS DISTINCT FROM v.version"
    );
    let wrong: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(&sql)
        .bind(aggregate_type)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(
        wrong.is_empty(),
        "{view}: (stream, events in the log, events applied) that differ: {wrong:?}"
    );
}

/// Streams and events per aggregate type in the event log.
async fn streams_and_events(conn: &mut PgConnection, aggregate_type: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(DISTINCT aggregate_id), count(*) FROM events WHERE aggregate_type = $1",
    )
    .bind(aggregate_type)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// The API's view of what a contact or campaign write made: it exists, once, as written.
async fn assert_stored_once(
    client: &reqwest::Client,
    address: &str,
    api_key: &str,
    write: &Write,
    answer: &Answer,
) {
    let id = || {
        answer.body["id"]
            .as_str()
            .expect("the write answered an id")
    };
    if write.is_contact() {
        let got = get(client, address, api_key, &format!("/v1/contacts/{}", id()))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{write:?}: {got:?}");
        assert_eq!(got.body["email"], write.body["email"], "{got:?}");
        assert_eq!(got.body["version"], 1, "one event: {got:?}");
        let email = write.body["email"].as_str().unwrap();
        let found = get(
            client,
            address,
            api_key,
            &format!(
                "/v1/contacts?email={email}&min_position={}",
                answer.body["position"].as_str().unwrap()
            ),
        )
        .await
        .unwrap();
        assert_eq!(found.status, 200, "{found:?}");
        assert_eq!(
            found.body["items"].as_array().map(Vec::len),
            Some(1),
            "one contact with {email}: {found:?}"
        );
    } else if write.is_campaign() {
        let got = get(client, address, api_key, &format!("/v1/campaigns/{}", id()))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{write:?}: {got:?}");
        assert_eq!(got.body["name"], write.body["name"], "{got:?}");
        assert_eq!(got.body["version"], 1, "one event: {got:?}");
    }
}

/// The `n`th write of client `c` in the kill test: contacts and campaigns by turns.
fn kill_test_write(c: usize, n: usize) -> Write {
    let key = format!("kill9-{c}-{n}");
    if n.is_multiple_of(2) {
        Write::new(
            "/v1/contacts",
            json!({"email": format!("kill9-{c}-{n}@example.com"), "first_name": format!("Client {c}")}),
            key,
        )
    } else {
        Write::new(
            "/v1/campaigns",
            json!({"name": format!("kill9 {c}-{n}")}),
            key,
        )
    }
}

/// Writes until the server stops answering; returns each write with its answer, `None`
/// for the write that got none.
async fn write_until_no_answer(
    client: reqwest::Client,
    address: String,
    api_key: String,
    c: usize,
    acknowledged: Arc<AtomicUsize>,
) -> Vec<(Write, Option<Answer>)> {
    let mut sent = Vec::new();
    for n in 0..100_000 {
        let write = kill_test_write(c, n);
        match send(&client, &address, &api_key, &write).await {
            Ok(answer) => {
                assert!(answer.is_success(), "{write:?} answered {answer:?}");
                acknowledged.fetch_add(1, Ordering::SeqCst);
                sent.push((write, Some(answer)));
            }
            Err(_) => {
                sent.push((write, None));
                break;
            }
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_acknowledged_before_a_kill_9_and_writes_retried_after_it_are_each_stored_once() {
    let data = DataDir::new();
    let server = serve(leadledger(&data.path));
    let api_key = admin_key(&data.path);
    let client = http_client();

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(write_until_no_answer(
                client.clone(),
                server.address.clone(),
                api_key.clone(),
                c,
                acknowledged.clone(),
            ))
        })
        .collect();
    eventually("80 writes acknowledged", Duration::from_secs(120), || {
        let n = acknowledged.load(Ordering::SeqCst);
        async move { (n >= 80).then_some(()) }
    })
    .await;
    server.signal(Signal::SIGKILL);
    server.wait();
    let mut writes = Vec::new();
    for task in clients {
        writes.extend(task.await.expect("client task"));
    }
    assert!(
        postgres_is_running(&data.path),
        "SIGKILL leaves the embedded PostgreSQL behind"
    );

    // A new server adopts the PostgreSQL left behind; clients retry what got no answer.
    let server = serve(leadledger(&data.path));
    let address = server.address.clone();
    let mut answered = Vec::new();
    for (write, answer) in writes {
        let answer = match answer {
            Some(first) => {
                // An acknowledged write, sent again: the recorded answer, nothing new.
                let again = send_until_acknowledged(&client, &address, &api_key, &write).await;
                assert!(again.replayed, "{write:?}: {again:?}");
                assert_eq!(again.status, first.status, "{write:?}");
                assert_eq!(again.body["id"], first.body["id"], "{write:?}");
                first
            }
            None => send_until_acknowledged(&client, &address, &api_key, &write).await,
        };
        answered.push((write, answer));
    }

    let ids: HashSet<&str> = answered
        .iter()
        .map(|(_, a)| a.body["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), answered.len(), "one resource per write");
    let pid = server.pid();
    wait_until_caught_up_by(|| leadledger(&data.path), pid, Duration::from_secs(60)).await;
    for (write, answer) in &answered {
        assert_stored_once(&client, &address, &api_key, write, answer).await;
    }

    // The event log: one stream of one event per write, nothing else.
    let contacts = answered.iter().filter(|(w, _)| w.is_contact()).count() as i64;
    let campaigns = answered.iter().filter(|(w, _)| w.is_campaign()).count() as i64;
    let mut conn = PgConnection::connect(&db_url(&data.path)).await.unwrap();
    assert_eq!(
        streams_and_events(&mut conn, "contact").await,
        (contacts, contacts)
    );
    assert_eq!(
        streams_and_events(&mut conn, "campaign").await,
        (campaigns, campaigns)
    );
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(total, contacts + campaigns, "no other event was written");

    // The read models: each row's applied events equal to its stream, and to a rebuild.
    assert_versions_match_streams(&mut conn, "contacts_view", "contact").await;
    assert_versions_match_streams(&mut conn, "campaigns_view", "campaign").await;
    conn.close().await.unwrap();
    assert_read_models_equal_a_rebuild(&data.path).await;

    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
    assert!(!postgres_is_running(&data.path));
}

/// What is done to the server's PostgreSQL while clients keep sending requests.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGKILL to the postmaster; the service must start it again. The test holds the
    /// start-up lock for a while, so the outage outlasts the pool's acquire timeout.
    PostmasterKilled,
    /// `pg_ctl restart -m fast` by an operator.
    FastRestart,
}

/// The `n`th write of client `c` in the outage tests: campaigns, contacts and spends.
fn outage_write(c: usize, n: usize, budget: &str) -> Write {
    let key = format!("outage-{c}-{n}");
    match n % 3 {
        0 => Write::new(
            "/v1/campaigns",
            json!({"name": format!("outage {c}-{n}")}),
            key,
        ),
        1 => Write::new(
            "/v1/contacts",
            json!({"email": format!("outage-{c}-{n}@example.com")}),
            key,
        ),
        _ => Write::new(
            format!("/v1/budgets/{budget}/spend"),
            json!({"amount": "0.01", "category": "ai"}),
            key,
        ),
    }
}

#[derive(Default)]
struct LoadCounters {
    acknowledged: AtomicUsize,
    /// 503 answers on `/v1` routes.
    unavailable: AtomicUsize,
    stop: AtomicBool,
}

/// A client under an outage: writes (each retried with its key until acknowledged),
/// reads and readiness checks, until told to stop. Every answer must be a success or a
/// well-formed 503, and come within [`ANSWER_WITHIN`]. Returns the acknowledged writes.
async fn client_under_outage(
    client: reqwest::Client,
    address: String,
    api_key: String,
    c: usize,
    budget: String,
    counters: Arc<LoadCounters>,
) -> Vec<(Write, Answer)> {
    let mut acknowledged = Vec::new();
    let check = |what: &str, answer: &Answer| {
        assert!(answer.took < ANSWER_WITHIN, "{what}: {answer:?}");
        if answer.status == 503 {
            answer.assert_unavailable_problem(what);
            counters.unavailable.fetch_add(1, Ordering::SeqCst);
        } else {
            assert!(answer.is_success(), "{what}: {answer:?}");
        }
    };
    let mut n = 0;
    while !counters.stop.load(Ordering::SeqCst) {
        let write = outage_write(c, n, &budget);
        n += 1;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            // The server never goes away here: every request gets an answer.
            let answer = send(&client, &address, &api_key, &write)
                .await
                .unwrap_or_else(|e| panic!("{write:?} got no answer: {e}"));
            check(&write.path, &answer);
            if answer.is_success() {
                counters.acknowledged.fetch_add(1, Ordering::SeqCst);
                acknowledged.push((write, answer));
                break;
            }
            assert!(Instant::now() < deadline, "{write:?} never acknowledged");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let list = get(&client, &address, &api_key, "/v1/campaigns?limit=5")
            .await
            .expect("list answered");
        check("GET /v1/campaigns", &list);
        if n.is_multiple_of(4) {
            let ready = ready(&client, &address).await.expect("ready answered");
            assert!(ready.took < ANSWER_WITHIN, "{ready:?}");
            assert!(matches!(ready.status, 200 | 503), "{ready:?}");
            if ready.status == 503 {
                assert!(ready.retry_after.is_some(), "{ready:?}");
            }
        }
    }
    acknowledged
}

/// The PostgreSQL owner's uid and gid, to run `pg_ctl` as when the tests run as root.
fn run_as_postgres_owner(cmd: &mut tokio::process::Command, data: &Path) {
    if Uid::effective().is_root() {
        let meta = std::fs::metadata(data.join("pg")).unwrap();
        cmd.uid(meta.uid()).gid(meta.gid());
    }
}

/// The directory of the PostgreSQL binaries the cluster runs from.
fn pg_bindir(data: &Path) -> PathBuf {
    let opts = std::fs::read_to_string(data.join("pg/postmaster.opts")).unwrap();
    let postgres = opts.split_whitespace().next().unwrap().trim_matches('"');
    Path::new(postgres).parent().unwrap().to_path_buf()
}

async fn rides_out(outage: Outage) {
    let data = DataDir::new();
    let server = serve(leadledger(&data.path));
    let api_key = admin_key(&data.path);
    let client = http_client();
    let budget = send_until_acknowledged(
        &client,
        &server.address,
        &api_key,
        &Write::new(
            "/v1/budgets",
            json!({"name": "outage", "limit": null}),
            "outage-budget",
        ),
    )
    .await;
    let budget = budget.body["id"].as_str().unwrap().to_string();

    let counters = Arc::new(LoadCounters::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(client_under_outage(
                client.clone(),
                server.address.clone(),
                api_key.clone(),
                c,
                budget.clone(),
                counters.clone(),
            ))
        })
        .collect();
    let acknowledged_at_least = |n: usize| {
        let (counters, clients) = (counters.clone(), &clients);
        move || {
            // A client stops early only by failing: its panic says why.
            assert!(!clients.iter().any(|t| t.is_finished()), "a client failed");
            let done = counters.acknowledged.load(Ordering::SeqCst) >= n;
            async move { done.then_some(()) }
        }
    };
    eventually(
        "40 writes acknowledged",
        Duration::from_secs(120),
        acknowledged_at_least(40),
    )
    .await;

    match outage {
        Outage::PostmasterKilled => {
            // Hold the lock a restart needs, so the outage lasts until seen from outside.
            let startup = std::fs::File::open(data.path.join("pg.lock")).unwrap();
            startup.lock().unwrap();
            let postmaster = postmaster_pid(&data.path).unwrap();
            kill(postmaster, Signal::SIGKILL).unwrap();
            eventually(
                "503s while PostgreSQL is down",
                Duration::from_secs(60),
                || {
                    assert!(!clients.iter().any(|t| t.is_finished()), "a client failed");
                    let seen = counters.unavailable.load(Ordering::SeqCst) > 0;
                    let (client, address) = (client.clone(), server.address.clone());
                    async move {
                        let ready = ready(&client, &address).await?;
                        (seen && ready.status == 503).then_some(())
                    }
                },
            )
            .await;
            // SIGKILL takes a moment to end the postmaster (and its parent to reap it):
            // wait for the killed process itself to be gone before asking whether any
            // postmaster runs.
            eventually(
                "the killed postmaster gone",
                Duration::from_secs(30),
                || async move { kill(postmaster, None).is_err().then_some(()) },
            )
            .await;
            assert!(
                !postgres_is_running(&data.path),
                "nothing restarted PostgreSQL while the start-up lock was held"
            );
            startup.unlock().unwrap();
        }
        Outage::FastRestart => {
            let mut cmd = tokio::process::Command::new(pg_bindir(&data.path).join("pg_ctl"));
            cmd.arg("-D")
                .arg(data.path.join("pg"))
                .args(["restart", "-m", "fast", "-w", "-t", "120", "-l"])
                .arg(data.path.join("pg/server.log"))
                .stdin(std::process::Stdio::null());
            run_as_postgres_owner(&mut cmd, &data.path);
            let out = cmd.output().await.unwrap();
            assert!(
                out.status.success(),
                "pg_ctl restart: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // The service recovers by itself, and serves writes again.
    eventually("ready again", Duration::from_secs(120), || {
        let (client, address) = (client.clone(), server.address.clone());
        async move { (ready(&client, &address).await?.status == 200).then_some(()) }
    })
    .await;
    let after = counters.acknowledged.load(Ordering::SeqCst);
    eventually(
        "40 more writes acknowledged after the outage",
        Duration::from_secs(120),
        acknowledged_at_least(after + 40),
    )
    .await;
    counters.stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for task in clients {
        acknowledged.extend(task.await.expect("client task"));
    }

    // Projections resumed and caught up.
    wait_until_caught_up_by(
        || leadledger(&data.path),
        server.pid(),
        Duration::from_secs(60),
    )
    .await;

    // Nothing acknowledged is lost, nothing is doubled.
    let address = server.address.clone();
    for (write, answer) in &acknowledged {
        assert_stored_once(&client, &address, &api_key, write, answer).await;
    }
    let spends: Vec<&str> = acknowledged
        .iter()
        .filter(|(w, _)| w.path.ends_with("/spend"))
        .map(|(_, a)| a.body["spend_id"].as_str().unwrap())
        .collect();
    let contacts = acknowledged.iter().filter(|(w, _)| w.is_contact()).count() as i64;
    let campaigns = acknowledged.iter().filter(|(w, _)| w.is_campaign()).count() as i64;
    let mut conn = PgConnection::connect(&db_url(&data.path)).await.unwrap();
    assert_eq!(
        streams_and_events(&mut conn, "contact").await,
        (contacts, contacts)
    );
    assert_eq!(
        streams_and_events(&mut conn, "campaign").await,
        (campaigns, campaigns)
    );
    let recorded: Vec<String> = sqlx::query_scalar(
        "SELECT payload::text FROM events WHERE aggregate_id = $1 AND event_type = 'SpendRecorded'",
    )
    .bind(&budget)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        recorded.len(),
        spends.len(),
        "one spend event per acknowledged spend"
    );
    for spend in &spends {
        assert_eq!(
            recorded.iter().filter(|p| p.contains(spend)).count(),
            1,
            "spend {spend} recorded once"
        );
    }
    let total = format!("{}.{:02}", spends.len() / 100, spends.len() % 100);
    let got = get(
        &client,
        &address,
        &api_key,
        &format!("/v1/budgets/{budget}"),
    )
    .await
    .unwrap();
    assert_eq!(got.body["spent"], total.as_str(), "{got:?}");

    // Every event applied once, and the listener is back: a session LISTENs again.
    assert_versions_match_streams(&mut conn, "contacts_view", "contact").await;
    assert_versions_match_streams(&mut conn, "campaigns_view", "campaign").await;
    let costs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM costs_view WHERE budget_id = $1::uuid")
            .bind(&budget)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(costs, spends.len() as i64, "one cost row per spend");
    let url = db_url(&data.path);
    eventually("the projection listener reconnected", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            let mut conn = PgConnection::connect(&url).await.ok()?;
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %leadledger_events%'",
            )
            .fetch_one(&mut conn)
            .await
            .ok()?;
            let _ = conn.close().await;
            (listening > 0).then_some(())
        }
    })
    .await;
    conn.close().await.unwrap();

    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
    assert!(!postgres_is_running(&data.path));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_its_postgres_is_killed_the_service_answers_503_with_retry_after_and_restarts_it() {
    rides_out(Outage::PostmasterKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_restart_of_postgres_under_load_loses_nothing_and_the_service_recovers_by_itself() {
    rides_out(Outage::FastRestart).await;
}

/// Sends `write` to one of two servers by turns until acknowledged: when one does not
/// answer (or is busy), the next attempt goes to the other, with the same key.
async fn send_to_either(
    client: &reqwest::Client,
    addresses: &[String; 2],
    api_key: &str,
    turn: &mut usize,
    write: &Write,
) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        *turn += 1;
        match send(client, &addresses[*turn % 2], api_key, write).await {
            Ok(answer) if answer.is_success() => return answer,
            Ok(answer) if answer.is_retryable() => {}
            Ok(answer) => panic!("{write:?} answered {answer:?}"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "{write:?} never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client of two servers, running whole jobs until told to stop: a contact created and
/// updated (two events), or a campaign created, started and paused (three). Returns how
/// many of each it completed.
async fn client_of_two(
    client: reqwest::Client,
    addresses: [String; 2],
    api_key: String,
    c: usize,
    counters: Arc<LoadCounters>,
) -> (usize, usize) {
    let (mut contacts, mut campaigns) = (0, 0);
    let mut turn = c;
    let mut n: usize = 0;
    while !counters.stop.load(Ordering::SeqCst) {
        let key = |step: &str| format!("shared-{c}-{n}-{step}");
        let mut steps = Vec::new();
        if n.is_multiple_of(2) {
            let email = format!("shared-{c}-{n}@example.com");
            for (step, name) in [("create", "One"), ("update", "Two")] {
                steps.push(Write::new(
                    "/v1/contacts",
                    json!({"email": email, "first_name": name}),
                    key(step),
                ));
            }
            contacts += 1;
        } else {
            let create = Write::new(
                "/v1/campaigns",
                json!({"name": format!("shared {c}-{n}")}),
                key("create"),
            );
            let created = send_to_either(&client, &addresses, &api_key, &mut turn, &create).await;
            counters.acknowledged.fetch_add(1, Ordering::SeqCst);
            let id = created.body["id"].as_str().unwrap().to_string();
            for action in ["start", "pause"] {
                steps.push(Write::new(
                    format!("/v1/campaigns/{id}/{action}"),
                    json!({}),
                    key(action),
                ));
            }
            campaigns += 1;
        }
        for write in &steps {
            send_to_either(&client, &addresses, &api_key, &mut turn, write).await;
            counters.acknowledged.fetch_add(1, Ordering::SeqCst);
        }
        n += 1;
    }
    (contacts, campaigns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_one_of_two_servers_is_killed_the_other_takes_over_its_projections_and_expiry_work() {
    use base64::Engine;
    let secret = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let first_data = DataDir::new();
    let mut cmd = leadledger(&first_data.path);
    cmd.env("LEADLEDGER_SECRET_KEY", &secret);
    let first = serve(cmd);
    let api_key = admin_key(&first_data.path);
    let url = db_url(&first_data.path);
    // Status and the second server go through the URL: a command on the first data dir
    // after the kill would be the last user of its PostgreSQL and stop it.
    let (_second_keep, second_data) = data_dir();
    let through_url = || {
        let mut cmd = leadledger(&second_data);
        cmd.env("DATABASE_URL", &url);
        cmd
    };
    wait_until_caught_up_by(through_url, first.pid(), Duration::from_secs(60)).await;

    let mut cmd = through_url();
    cmd.env("LEADLEDGER_SECRET_KEY", &secret);
    let second = serve(cmd);
    let client = http_client();
    eventually(
        "the second server is ready",
        Duration::from_secs(60),
        || {
            let (client, address) = (client.clone(), second.address.clone());
            async move { (ready(&client, &address).await?.status == 200).then_some(()) }
        },
    )
    .await;
    let first_suffix = format!(":pid{}", first.pid());
    for p in projection_status(through_url()).await {
        assert!(
            p["held_by"]
                .as_str()
                .is_some_and(|h| h.ends_with(&first_suffix)),
            "the second server waits while the first holds every projection: {p}"
        );
    }

    let counters = Arc::new(LoadCounters::default());
    let addresses = [first.address.clone(), second.address.clone()];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(client_of_two(
                client.clone(),
                addresses.clone(),
                api_key.clone(),
                c,
                counters.clone(),
            ))
        })
        .collect();
    let acknowledged_at_least = |n: usize| {
        let (counters, clients) = (counters.clone(), &clients);
        move || {
            // A client stops early only by failing: its panic says why.
            assert!(!clients.iter().any(|t| t.is_finished()), "a client failed");
            let done = counters.acknowledged.load(Ordering::SeqCst) >= n;
            async move { done.then_some(()) }
        }
    };
    eventually(
        "60 writes acknowledged",
        Duration::from_secs(120),
        acknowledged_at_least(60),
    )
    .await;
    first.signal(Signal::SIGKILL);
    first.wait();

    // The survivor takes every projection over (and catches up)...
    wait_until_caught_up_by(through_url, second.pid(), Duration::from_secs(60)).await;
    // ...and the expiry of budget holds: only it is left to record one.
    let budget = send_until_acknowledged(
        &client,
        &second.address,
        &api_key,
        &Write::new(
            "/v1/budgets",
            json!({"name": "expiry", "limit": "10"}),
            "shared-budget",
        ),
    )
    .await;
    let budget = budget.body["id"].as_str().unwrap().to_string();
    let hold = send_until_acknowledged(
        &client,
        &second.address,
        &api_key,
        &Write::new(
            format!("/v1/budgets/{budget}/reservations"),
            json!({"amount": "5", "category": "ai", "ttl_seconds": 1}),
            "shared-hold",
        ),
    )
    .await;
    let reservation = hold.body["reservation_id"].as_str().unwrap().to_string();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let actor = eventually(
        "the hold expired by the survivor's worker",
        Duration::from_secs(60),
        || {
            let url = url.clone();
            let budget = budget.clone();
            async move {
                let mut conn = PgConnection::connect(&url).await.ok()?;
                let actor: Option<String> = sqlx::query_scalar(
                    "SELECT metadata->>'actor' FROM events
                     WHERE aggregate_id = $1 AND event_type = 'ReservationExpired'",
                )
                .bind(&budget)
                .fetch_optional(&mut conn)
                .await
                .ok()?;
                let _ = conn.close().await;
                actor
            }
        },
    )
    .await;
    assert_eq!(actor, "worker:budget-expiry");
    eventually(
        "the hold left the budget_holds read model",
        Duration::from_secs(60),
        || {
            let url = url.clone();
            let reservation = reservation.clone();
            async move {
                let mut conn = PgConnection::connect(&url).await.ok()?;
                let held: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM budget_holds_view WHERE reservation_id = $1::uuid",
                )
                .bind(&reservation)
                .fetch_one(&mut conn)
                .await
                .ok()?;
                let _ = conn.close().await;
                (held == 0).then_some(())
            }
        },
    )
    .await;

    let after = counters.acknowledged.load(Ordering::SeqCst);
    eventually(
        "30 more writes acknowledged by the survivor",
        Duration::from_secs(120),
        acknowledged_at_least(after + 30),
    )
    .await;
    counters.stop.store(true, Ordering::SeqCst);
    let (mut contacts, mut campaigns) = (0i64, 0i64);
    for task in clients {
        let (a, b) = task.await.expect("client task");
        contacts += a as i64;
        campaigns += b as i64;
    }

    // Every job's events exactly once, and every event applied exactly once.
    assert_eq!(
        streams_and_events(&mut conn, "contact").await,
        (contacts, 2 * contacts)
    );
    assert_eq!(
        streams_and_events(&mut conn, "campaign").await,
        (campaigns, 3 * campaigns)
    );
    wait_until_caught_up_by(through_url, second.pid(), Duration::from_secs(60)).await;
    assert_versions_match_streams(&mut conn, "contacts_view", "contact").await;
    assert_versions_match_streams(&mut conn, "campaigns_view", "campaign").await;
    conn.close().await.unwrap();

    second.signal(Signal::SIGTERM);
    assert!(second.wait().success());
    // The first server's PostgreSQL has no user left: stop it.
    drop(first_data);
}
