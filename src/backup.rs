//! Backups and restores of the database (`leadledger backup DEST`, `leadledger restore SRC`):
//! a logical dump taken in one exported snapshot while the service runs, with a manifest
//! that says what the snapshot held, and the secret key only when asked for.
//!
//! Why a logical dump (`pg_dump -Fc`) rather than a base backup (`pg_basebackup`): it works
//! the same for the embedded cluster and for any `DATABASE_URL` (a managed server gives no
//! replication connection), it restores into any later PostgreSQL, and it holds this one
//! database only. What it cannot give is point-in-time recovery; for that, operators run
//! base backups with WAL archiving (`docs/scaling.md`).
//!
//! The one property a restore must keep beyond the rows: the event feed orders events by
//! their writing transaction's id (`xid8`), so the restored log must lie below every
//! transaction the new server will run. A restore into a new data directory moves the new
//! cluster's transaction counter past the backup's; a restore into a server whose counter
//! is behind the backup's is refused before anything is written.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use tokio::process::Command;

use crate::config::Config;
use crate::embedded::{self, EmbeddedError, EmbeddedOptions, EmbeddedPostgres};

/// The dump inside a backup directory.
pub const DUMP_FILE: &str = "leadledger.dump";
/// What the backup holds, as JSON.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The secret key, when the backup was asked to include it.
pub const KEY_FILE: &str = "secret.key";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{what}: {detail}")]
    Tool { what: String, detail: String },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("the manifest {0}: {1}")]
    Manifest(String, serde_json::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(path.display().to_string(), e)
}

/// What a backup holds: enough to check a restore against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub leadledger_version: String,
    pub server_version: String,
    pub latest_migration: i64,
    /// Events in the snapshot.
    pub events: i64,
    /// A sum of a hash of every event (stream, sequence, payload): equal sums after a
    /// restore say the log came back whole.
    pub checksum: String,
    /// The snapshot's next transaction id: every event in the backup was written below it.
    pub next_transaction_id: u64,
    pub secret_key_included: bool,
}

/// The log's count and checksum, and the transaction counter, as one snapshot sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    pub events: i64,
    pub checksum: String,
    pub next_transaction_id: u64,
}

pub async fn log_state(conn: &mut PgConnection) -> Result<LogState, BackupError> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "events!",
                  coalesce(sum(hashtextextended(
                      aggregate_type || '/' || aggregate_id || '/' || sequence::text || '/'
                      || event_type || '/' || payload::text, 0)::numeric), 0)::text AS "checksum!",
                  pg_snapshot_xmax(pg_current_snapshot())::text AS "next!"
           FROM events"#
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(LogState {
        events: row.events,
        checksum: row.checksum,
        next_transaction_id: row.next.parse().unwrap_or(0),
    })
}

/// What `backup` did.
#[derive(Debug)]
pub struct BackupReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub bytes: u64,
}

/// Writes a backup of the configured database into `dest` (a new or empty directory):
/// `pg_dump -Fc` in a snapshot exported by a transaction that also counts the log, so
/// the manifest describes exactly what the dump holds, whatever is written meanwhile.
pub async fn backup(
    config: &Config,
    url: &str,
    dest: &Path,
    include_secret_key: bool,
) -> Result<BackupReport, BackupError> {
    prepare_destination(dest)?;
    // Read the key before anything is written, so a bad key fails the backup early.
    let key = if include_secret_key {
        Some(secret_key_text(config)?)
    } else {
        None
    };
    let bindir = embedded::server_bindir().await?;
    let mut conn = PgConnection::connect(url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let snapshot = sqlx::query_scalar!(r#"SELECT pg_export_snapshot() AS "snapshot!""#)
        .fetch_one(&mut *tx)
        .await?;
    let state = log_state(&mut tx).await?;
    let server_version = sqlx::query_scalar!(r#"SELECT current_setting('server_version') AS "v!""#)
        .fetch_one(&mut *tx)
        .await?;
    let latest_migration = sqlx::query_scalar!(
        r#"SELECT coalesce(max(version), 0) AS "v!" FROM _sqlx_migrations WHERE success"#
    )
    .fetch_one(&mut *tx)
    .await?;
    let dump = dest.join(DUMP_FILE);
    let output = Command::new(bindir.join("pg_dump"))
        .arg("--format=custom")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--file")
        .arg(&dump)
        .arg("--dbname")
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| tool("pg_dump", e.to_string()))?;
    // The snapshot must live until pg_dump has taken it; it has now.
    tx.rollback().await?;
    let _ = conn.close().await;
    if !output.status.success() {
        return Err(tool(
            "pg_dump",
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    if let Some(key) = &key {
        write_private(&dest.join(KEY_FILE), key)?;
    }
    let manifest = Manifest {
        format: 1,
        created_at: chrono::Utc::now(),
        leadledger_version: env!("CARGO_PKG_VERSION").into(),
        server_version,
        latest_migration,
        events: state.events,
        checksum: state.checksum,
        next_transaction_id: state.next_transaction_id,
        secret_key_included: key.is_some(),
    };
    let path = dest.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| BackupError::Manifest(path.display().to_string(), e))?;
    std::fs::write(&path, text + "\n").map_err(io(&path))?;
    let bytes = std::fs::metadata(&dump).map_err(io(&dump))?.len();
    Ok(BackupReport {
        dir: dest.to_path_buf(),
        manifest,
        bytes,
    })
}

/// `dest` must not exist or be an empty directory: a backup never mixes with other files.
fn prepare_destination(dest: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::Refused(format!(
                    "{} is not empty; a backup goes into a new or empty directory",
                    dest.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dest)
            .map_err(io(dest)),
        Err(e) => Err(io(dest)(e)),
    }
}

/// The configured secret key's text: the environment's, else the data directory's file
/// (made if absent, as the service would make it).
fn secret_key_text(config: &Config) -> Result<String, BackupError> {
    let refused = |e: crate::secrets::SecretError| BackupError::Refused(e.to_string());
    if let Some(key) = &config.secret_key {
        crate::secrets::SecretBox::load(Some(key), &config.data_dir).map_err(refused)?;
        return Ok(key.trim().to_string());
    }
    config.secrets().map_err(refused)?;
    let path = config.data_dir.join("secret.key");
    Ok(std::fs::read_to_string(&path)
        .map_err(io(&path))?
        .trim()
        .to_string())
}

fn write_private(path: &Path, text: &str) -> Result<(), BackupError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(format!("{text}\n").as_bytes())
        .map_err(io(path))
}

fn tool(what: &str, detail: String) -> BackupError {
    BackupError::Tool {
        what: what.into(),
        detail,
    }
}

pub fn read_manifest(src: &Path) -> Result<Manifest, BackupError> {
    let path = src.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| BackupError::Manifest(path.display().to_string(), e))
}

/// Where the secret key of a restore went.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyOutcome {
    /// Written to this file.
    Written(PathBuf),
    /// The file exists already with this key.
    AlreadyThere(PathBuf),
    /// `LEADLEDGER_SECRET_KEY` is set: the operator gives the key.
    FromEnvironment,
    /// The backup holds no key.
    NotInBackup,
}

#[derive(Debug)]
pub struct RestoreReport {
    pub manifest: Manifest,
    pub target: String,
    pub key: KeyOutcome,
}

/// Restores the backup in `src` into the configured database: with `DATABASE_URL`, an
/// empty database on a server whose transaction counter is past the backup's; without,
/// a new data directory (its cluster is made here). Checks the restored log against the
/// manifest.
pub async fn restore(config: &Config, src: &Path) -> Result<RestoreReport, BackupError> {
    let manifest = read_manifest(src)?;
    let dump = src.join(DUMP_FILE);
    if !dump.is_file() {
        return Err(BackupError::Refused(format!(
            "{} has no {DUMP_FILE}: not a leadledger backup",
            src.display()
        )));
    }
    if manifest.latest_migration > crate::db::latest_migration() {
        return Err(BackupError::Refused(format!(
            "the backup was made by a newer leadledger (migration {}); this one knows up to {}",
            manifest.latest_migration,
            crate::db::latest_migration()
        )));
    }
    check_key_target(config, src, &manifest)?;
    let (url, target, embedded) = match &config.database_url {
        Some(url) => {
            let mut conn = PgConnection::connect(url).await?;
            check_empty(&mut conn).await?;
            let next = next_transaction_id(&mut conn).await?;
            let _ = conn.close().await;
            if next < manifest.next_transaction_id {
                return Err(BackupError::Refused(format!(
                    "this server's transaction counter ({next}) is behind the backup's ({}); \
                     the event feed orders events by transaction id, so restore into a new \
                     data directory (unset DATABASE_URL), or into a server whose counter is \
                     past it (see docs/scaling.md, \"Restoring\")",
                    manifest.next_transaction_id
                )));
            }
            (
                url.clone(),
                "the database of DATABASE_URL".to_string(),
                None,
            )
        }
        None => {
            if config.data_dir.join("pg").exists() {
                return Err(BackupError::Refused(format!(
                    "{} already holds a database; restore into a new data directory \
                     (LEADLEDGER_DATA_DIR) or an empty database (DATABASE_URL)",
                    config.data_dir.display()
                )));
            }
            let pg = new_cluster(&config.data_dir, manifest.next_transaction_id).await?;
            (
                pg.url(),
                format!("a new cluster in {}", config.data_dir.display()),
                Some(pg),
            )
        }
    };
    let result = restore_into(&url, &dump, &manifest).await;
    if let Some(pg) = embedded {
        pg.stop().await?;
    }
    result?;
    let key = restore_key(config, src, &manifest)?;
    Ok(RestoreReport {
        manifest,
        target,
        key,
    })
}

async fn restore_into(url: &str, dump: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let bindir = embedded::server_bindir().await?;
    let output = Command::new(bindir.join("pg_restore"))
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--exit-on-error")
        .arg("--single-transaction")
        .arg("--dbname")
        .arg(url)
        .arg(dump)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| tool("pg_restore", e.to_string()))?;
    if !output.status.success() {
        return Err(tool(
            "pg_restore",
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    let mut conn = PgConnection::connect(url).await?;
    let state = log_state(&mut conn).await?;
    let _ = conn.close().await;
    if state.events != manifest.events || state.checksum != manifest.checksum {
        return Err(BackupError::Refused(format!(
            "the restored log differs from the backup's manifest ({} events restored, {} \
             expected)",
            state.events, manifest.events
        )));
    }
    Ok(())
}

/// A restore target holds no relation outside PostgreSQL's own schemas.
async fn check_empty(conn: &mut PgConnection) -> Result<(), BackupError> {
    let relations = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
             AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
             AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"#
    )
    .fetch_one(&mut *conn)
    .await?;
    if relations > 0 {
        return Err(BackupError::Refused(format!(
            "the database of DATABASE_URL is not empty ({relations} tables, views or \
             sequences); restore into an empty database"
        )));
    }
    Ok(())
}

async fn next_transaction_id(conn: &mut PgConnection) -> Result<u64, BackupError> {
    let next =
        sqlx::query_scalar!(r#"SELECT pg_snapshot_xmax(pg_current_snapshot())::text AS "n!""#)
            .fetch_one(&mut *conn)
            .await?;
    Ok(next.parse().unwrap_or(0))
}

/// A new embedded cluster whose transaction counter is past `next`.
async fn new_cluster(root: &Path, next: u64) -> Result<EmbeddedPostgres, BackupError> {
    let options = EmbeddedOptions::default();
    let pg = EmbeddedPostgres::start(root, &options).await?;
    let mut conn = PgConnection::connect_with(&pg.connect_options()).await?;
    let current = next_transaction_id(&mut conn).await?;
    let _ = conn.close().await;
    if current >= next {
        return Ok(pg);
    }
    pg.stop().await?;
    embedded::advance_transaction_ids(root, next).await?;
    Ok(EmbeddedPostgres::start(root, &options).await?)
}

/// Refuses before anything is written when the backup's key would overwrite another.
fn check_key_target(config: &Config, src: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    if !manifest.secret_key_included || config.secret_key.is_some() {
        return Ok(());
    }
    let from = src.join(KEY_FILE);
    let key = std::fs::read_to_string(&from).map_err(io(&from))?;
    let to = config.data_dir.join("secret.key");
    match std::fs::read_to_string(&to) {
        Ok(existing) if existing.trim() != key.trim() => Err(BackupError::Refused(format!(
            "{} holds another secret key; move it away to restore the backup's",
            to.display()
        ))),
        _ => Ok(()),
    }
}

fn restore_key(
    config: &Config,
    src: &Path,
    manifest: &Manifest,
) -> Result<KeyOutcome, BackupError> {
    if !manifest.secret_key_included {
        return Ok(KeyOutcome::NotInBackup);
    }
    if config.secret_key.is_some() {
        return Ok(KeyOutcome::FromEnvironment);
    }
    let from = src.join(KEY_FILE);
    let key = std::fs::read_to_string(&from).map_err(io(&from))?;
    let to = config.data_dir.join("secret.key");
    match std::fs::read_to_string(&to) {
        Ok(existing) if existing.trim() == key.trim() => Ok(KeyOutcome::AlreadyThere(to)),
        Ok(_) => Err(BackupError::Refused(format!(
            "{} holds another key; move it away to restore the backup's",
            to.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.data_dir)
                .map_err(io(&config.data_dir))?;
            write_private(&to, key.trim())?;
            Ok(KeyOutcome::Written(to))
        }
        Err(e) => Err(io(&to)(e)),
    }
}
