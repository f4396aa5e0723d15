//! The test harness: a real PostgreSQL for the whole run, a fresh migrated database for
//! each test, and `spawn_app`, which starts the real server on port 0.
//!
//! Without `DATABASE_URL`, one private cluster is started for the test run through the
//! same embedded code path the service uses; a watcher process stops and removes it when
//! the test process exits. Each test's database is cloned from a template database that
//! was migrated once (named after the migrations, so a changed migration makes a new one).

use std::sync::OnceLock;
use std::time::Duration;

use leadledger::app::keys::{self, Scope};
use leadledger::app::workers::{self, Workers};
use leadledger::app::{App, Limits};
use leadledger::db::{self, MIGRATOR};
use leadledger::embedded::{EmbeddedOptions, EmbeddedPostgres};
use leadledger::http;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

pub struct Harness {
    /// Connection options for the server; `.database(..)` picks the database.
    base: PgConnectOptions,
    /// The database to connect to for CREATE/DROP DATABASE.
    admin_db: String,
    template: String,
    embedded: Option<EmbeddedPostgres>,
    external_url: Option<url::Url>,
}

pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    // Built on a thread of its own with its own runtime: every test has its own runtime,
    // and nothing made here may be tied to one of them.
    HARNESS.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(Harness::init())
        })
        .join()
        .expect("harness init panicked")
    })
}

impl Harness {
    async fn init() -> Self {
        leadledger::telemetry::init(leadledger::config::LogFormat::Pretty);
        let (base, admin_db, embedded, external_url) = match std::env::var("DATABASE_URL") {
            Ok(url) => {
                let options: PgConnectOptions = url.parse().expect("DATABASE_URL parses");
                let admin_db = options.get_database().unwrap_or("postgres").to_string();
                let parsed = url::Url::parse(&url).expect("DATABASE_URL is a URL");
                (options, admin_db, None, Some(parsed))
            }
            Err(_) => {
                let dir = std::env::temp_dir().join(format!(
                    "leadledger-test-{}-{}",
                    std::process::id(),
                    uuid::Uuid::new_v4().simple()
                ));
                let options = EmbeddedOptions {
                    durable: false,
                    max_connections: 400,
                };
                let pg = EmbeddedPostgres::start(&dir, &options)
                    .await
                    .expect("the test cluster starts");
                pg.stop_and_remove_when_process_exits()
                    .expect("the cluster watcher starts");
                (
                    pg.connect_options_for("postgres"),
                    "postgres".to_string(),
                    Some(pg),
                    None,
                )
            }
        };
        let mut harness = Self {
            base,
            admin_db,
            template: String::new(),
            embedded,
            external_url,
        };
        harness.template = harness.ensure_template().await;
        harness
    }

    async fn admin(&self) -> PgConnection {
        self.base
            .clone()
            .database(&self.admin_db)
            .connect()
            .await
            .expect("admin connection")
    }

    /// A template database migrated to this build's migrations, made once per content.
    async fn ensure_template(&self) -> String {
        let mut hasher = Sha256::new();
        for m in MIGRATOR.iter() {
            hasher.update(m.version.to_le_bytes());
            hasher.update(&*m.checksum);
        }
        let digest = hasher.finalize();
        let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let template = format!("leadledger_tpl_{short}");
        let mut admin = self.admin().await;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&template)
                .fetch_one(&mut admin)
                .await
                .expect("query pg_database");
        if exists {
            return template;
        }
        // Migrate a scratch database, then publish it under the template's name in one
        // step, so a concurrent test run never clones a half-migrated template.
        let scratch = format!("leadledger_scratch_{}", uuid::Uuid::new_v4().simple());
        execute(&mut admin, &format!("CREATE DATABASE {scratch}")).await;
        // One plain connection, closed before the rename: a pooled one may linger.
        let mut conn = self
            .base
            .clone()
            .database(&scratch)
            .connect()
            .await
            .expect("connect scratch");
        MIGRATOR.run(&mut conn).await.expect("migrations apply");
        conn.close().await.expect("close scratch connection");
        // The closed pool's backends may take a moment to exit (55006 until they have).
        let rename = format!("ALTER DATABASE {scratch} RENAME TO {template}");
        for attempt in 0.. {
            match sqlx::query(&rename).execute(&mut admin).await {
                Ok(_) => return template,
                Err(e) if attempt < 100 && code(&e) == Some("55006") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Another test run published the same template first.
                Err(_) => break,
            }
        }
        execute(
            &mut admin,
            &format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"),
        )
        .await;
        template
    }

    /// A new database cloned from the template.
    pub async fn fresh_database(&self) -> String {
        let name = format!("leadledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = self.admin().await;
        let sql = format!("CREATE DATABASE {name} TEMPLATE {}", self.template);
        for attempt in 0.. {
            match sqlx::query(&sql).execute(&mut admin).await {
                Ok(_) => break,
                // 55006: the template is busy (another clone is being made); try again.
                Err(e) if attempt < 50 && code(&e) == Some("55006") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("creating a test database: {e}"),
            }
        }
        name
    }

    /// A new database with nothing in it (not cloned from the migrated template).
    pub async fn empty_database(&self) -> String {
        let name = format!("leadledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = self.admin().await;
        execute(
            &mut admin,
            &format!("CREATE DATABASE {name} TEMPLATE template0"),
        )
        .await;
        name
    }

    pub fn options(&self, database: &str) -> PgConnectOptions {
        self.base.clone().database(database)
    }

    /// A URL for `database`, for child processes.
    pub fn url(&self, database: &str) -> String {
        match (&self.embedded, &self.external_url) {
            (Some(pg), _) => pg.url_for_database(database),
            (None, Some(url)) => {
                let mut url = url.clone();
                url.set_path(&format!("/{database}"));
                url.to_string()
            }
            (None, None) => unreachable!("one of the two is always set"),
        }
    }

    /// Drops a test database, closing whatever still uses it.
    pub fn drop_database(&'static self, name: String) {
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(async {
                    let mut admin = self.admin().await;
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                })
        })
        .join();
    }
}

fn code(e: &sqlx::Error) -> Option<&str> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| match c {
            std::borrow::Cow::Borrowed(s) => s,
            std::borrow::Cow::Owned(_) => "other",
        })
}

// Test-harness DDL: identifiers cannot be bound, and these names are generated here.
async fn execute(conn: &mut PgConnection, sql: &str) {
    sqlx::query(sql).execute(conn).await.expect(sql);
}

/// A running server on its own fresh database, with its background workers, and one API
/// key of each scope.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub database: String,
    pub admin_key: String,
    pub write_key: String,
    pub read_key: String,
    /// The app this server runs, as `serve` assembles it.
    pub state: App,
    shutdown: CancellationToken,
    workers: Option<Workers>,
    /// A server started beside another leaves the database to it.
    owns_database: bool,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(true).await
}

/// `with_workers = false` starts no projection runner (tests that run their own).
pub async fn spawn_app_with(with_workers: bool) -> TestApp {
    spawn(
        with_workers,
        http::ServeOptions {
            grace: Duration::from_secs(5),
            ..http::ServeOptions::default()
        },
    )
    .await
}

/// A fixed secret key for the tests' throw-away databases (base64 of 32 bytes).
pub const TEST_SECRET_KEY: &str = "dGVzdC1vbmx5LXNlY3JldC1rZXktMzItYnl0ZXMhISE=";

/// The configuration the tests run with: every default, and an explicit secret key.
pub fn test_config() -> leadledger::config::Config {
    leadledger::config::Config {
        database_url: None,
        data_dir: std::env::temp_dir().join("leadledger-tests"),
        log_format: leadledger::config::LogFormat::Pretty,
        db_pool_size: 20,
        snapshot_every: leadledger::store::DEFAULT_SNAPSHOT_EVERY,
        secret_key: Some(TEST_SECRET_KEY.into()),
    }
}

/// The app on `pool`, assembled as `serve` assembles it.
pub fn build_app(pool: sqlx::PgPool) -> App {
    App::build(pool, &test_config(), Limits::default()).expect("the test key is valid")
}

/// The app served with these connection settings.
pub async fn spawn_app_serving(options: http::ServeOptions) -> TestApp {
    spawn(true, options).await
}

/// The app with `configure` applied to its state before it is served (outbound settings).
pub async fn spawn_app_configured(configure: impl FnOnce(&mut App)) -> TestApp {
    let options = http::ServeOptions {
        grace: Duration::from_secs(5),
        ..http::ServeOptions::default()
    };
    spawn_configured(true, options, None, configure).await
}

/// A second server on `other`'s database, with its own workers.
pub async fn spawn_beside(other: &TestApp, configure: impl FnOnce(&mut App)) -> TestApp {
    let options = http::ServeOptions {
        grace: Duration::from_secs(5),
        ..http::ServeOptions::default()
    };
    spawn_configured(true, options, Some(other.database.clone()), configure).await
}

async fn spawn(with_workers: bool, options: http::ServeOptions) -> TestApp {
    spawn_configured(with_workers, options, None, |_| {}).await
}

async fn spawn_configured(
    with_workers: bool,
    options: http::ServeOptions,
    database: Option<String>,
    configure: impl FnOnce(&mut App),
) -> TestApp {
    let harness = harness();
    let owns_database = database.is_none();
    let database = match database {
        Some(name) => name,
        None => harness.fresh_database().await,
    };
    let pool = db::pool_options(20)
        .connect_with(harness.options(&database))
        .await
        .expect("test pool");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let address = format!("http://{}", listener.local_addr().expect("local addr"));
    let shutdown = CancellationToken::new();
    let mut state = build_app(pool.clone());
    configure(&mut state);
    let workers = with_workers.then(|| workers::start(&state));
    let app = http::router(state.clone());
    let (_, admin_key) = keys::create_key(&pool, "test admin", Scope::Admin)
        .await
        .unwrap();
    let (_, write_key) = keys::create_key(&pool, "test write", Scope::Write)
        .await
        .unwrap();
    let (_, read_key) = keys::create_key(&pool, "test read", Scope::Read)
        .await
        .unwrap();
    let stop = shutdown.clone();
    tokio::spawn(http::serve_with(
        listener,
        app,
        async move { stop.cancelled().await },
        options,
    ));
    TestApp {
        address,
        client: reqwest::Client::new(),
        pool,
        database,
        admin_key,
        write_key,
        read_key,
        state,
        shutdown,
        workers,
        owns_database,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    /// GET with the read key.
    pub async fn read(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(&self.read_key)
            .send()
            .await
            .expect("request sent")
    }

    /// POST a JSON body with the write key.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.write_key)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Creates a contact from `body` (a new email); returns its id.
    pub async fn create_contact(&self, body: &Value) -> String {
        created_id(self.post("/v1/contacts", body).await).await
    }

    /// [`TestApp::create_contact`] under an idempotency key, so that its reply is recorded.
    pub async fn create_contact_recorded(&self, body: &Value, key: &str) -> String {
        let response = self
            .client
            .post(self.url("/v1/contacts"))
            .bearer_auth(&self.write_key)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .expect("request sent");
        created_id(response).await
    }

    /// Creates a campaign; returns its JSON.
    pub async fn create_campaign(&self, name: &str) -> Value {
        let response = self.post("/v1/campaigns", &json!({"name": name})).await;
        assert_eq!(response.status().as_u16(), 201);
        response.json().await.unwrap()
    }

    /// Rows of a table, to check that a refused request changed nothing.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(w) = &self.workers {
            w.cancel();
        }
        self.shutdown.cancel();
        if self.owns_database {
            harness().drop_database(std::mem::take(&mut self.database));
        }
    }
}

/// Asserts a problem+json answer with `status`, returning its body.
/// The id of the contact a creation answered with (201).
async fn created_id(response: reqwest::Response) -> String {
    assert_eq!(response.status().as_u16(), 201);
    let created: Value = response.json().await.unwrap();
    created["id"].as_str().unwrap().to_string()
}

pub async fn assert_problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: serde_json::Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status, "problem status field");
    assert!(body["type"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    body
}

/// How long a test waits for what it wrote to show in the feed.
pub const FEED_WAIT: Duration = Duration::from_secs(10);

/// Reads with `read` until `done` holds for what it read, or [`FEED_WAIT`] has passed, and
/// returns the last read for the caller to check. The feed ends where every older
/// transaction of the whole cluster has ended, and other tests' transactions run beside
/// each test's: events just committed may show a moment later.
pub async fn read_until<T>(mut read: impl AsyncFnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = tokio::time::Instant::now() + FEED_WAIT;
    loop {
        let got = read().await;
        if done(&got) || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes raw rows with `insert` (one statement, no parameters), then analyzes `events`: for
/// tests that shape the log's statistics.
pub async fn insert_then_analyze_events(pool: &sqlx::PgPool, insert: &str) {
    sqlx::query(insert).execute(pool).await.unwrap();
    sqlx::query("ANALYZE events").execute(pool).await.unwrap();
}

/// The statement `conn` has prepared that PostgreSQL planned most often for its values,
/// and how many times.
pub async fn most_value_plans(conn: &mut sqlx::PgConnection) -> (String, i64) {
    sqlx::query_as(
        "SELECT statement, custom_plans FROM pg_prepared_statements
         ORDER BY custom_plans DESC LIMIT 1",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}
