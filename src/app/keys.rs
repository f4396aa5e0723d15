//! API keys: random 256-bit keys shown once and stored only as a SHA-256 hash, with one
//! scope each (`read` ⊂ `write` ⊂ `admin`). The `/v1` middleware that asks for them is
//! `http::auth`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::app::error::AppError;
use crate::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key a request was authenticated with (never the key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub scope: Scope,
}

/// A key as listed: never the key, only its first characters.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: String,
    pub scope: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const KEY_PREFIX: &str = "ll_";

fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Creates a key; returns its id and the plaintext, which is not stored anywhere.
pub async fn create_key(
    pool: &PgPool,
    name: &str,
    scope: Scope,
) -> Result<(Uuid, String), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    insert_key(&mut conn, name, scope).await
}

async fn insert_key(
    conn: &mut PgConnection,
    name: &str,
    scope: Scope,
) -> Result<(Uuid, String), sqlx::Error> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let id = Uuid::now_v7();
    let prefix: String = key.chars().take(KEY_PREFIX.len() + 6).collect();
    sqlx::query!(
        "INSERT INTO api_keys (id, name, scope, key_hash, prefix) VALUES ($1, $2, $3, $4, $5)",
        id,
        name,
        scope.as_str(),
        hash(&key),
        prefix
    )
    .execute(conn)
    .await?;
    Ok((id, key))
}

pub async fn list_keys(pool: &PgPool) -> Result<Vec<KeyInfo>, sqlx::Error> {
    sqlx::query_as!(
        KeyInfo,
        "SELECT id, name, scope, prefix, created_at, revoked_at FROM api_keys ORDER BY created_at"
    )
    .fetch_all(pool)
    .await
}

/// Revokes a key; false when there is no such active key. Every process's
/// [`KeyCache`] hears of it at the revocation's commit ([`KEYS_CHANNEL`]).
pub async fn revoke_key(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let revoked = sqlx::query_scalar!(
        r#"WITH revoked AS (
               UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
               RETURNING id
           )
           SELECT pg_notify($2, id::text) IS NOT NULL AS "revoked!" FROM revoked"#,
        id,
        KEYS_CHANNEL
    )
    .fetch_optional(pool)
    .await?;
    Ok(revoked.is_some())
}

/// Channel notified when a key is revoked.
pub const KEYS_CHANNEL: &str = "leadledger_keys";
/// How long a looked-up key is trusted without asking the database again: the bound on
/// how late a revocation takes effect in a process that missed its notification.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);
/// Entries kept at most; past it the cache starts over (only live keys are kept, so
/// guessing keys cannot fill it).
const KEY_CACHE_MAX: usize = 10_000;

/// Live keys recently looked up, by the SHA-256 of the key, so that a request usually
/// costs no query. An entry is trusted for [`KEY_CACHE_TTL`]; a revocation anywhere clears
/// every listening process's cache at once ([`listen_for_revocations`]).
/// A key looked up, and when.
type Cached = (ApiKey, Instant);

#[derive(Clone, Default)]
pub struct KeyCache {
    /// By the SHA-256 of the key.
    entries: Arc<Mutex<HashMap<Vec<u8>, Cached>>>,
}

impl KeyCache {
    fn get(&self, hash: &[u8]) -> Option<ApiKey> {
        let entries = lock(&self.entries);
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(key, _)| *key)
    }

    fn put(&self, hash: Vec<u8>, key: ApiKey) {
        let mut entries = lock(&self.entries);
        if entries.len() >= KEY_CACHE_MAX {
            entries.clear();
        }
        entries.insert(hash, (key, Instant::now()));
    }

    /// Forgets every key: the next request of each asks the database.
    pub fn clear(&self) {
        lock(&self.entries).clear();
    }
}

/// [`lookup`], answered from `cache` while its entry is fresh.
pub async fn lookup_cached(
    pool: &PgPool,
    cache: &KeyCache,
    key: &str,
) -> Result<Option<ApiKey>, AppError> {
    let hashed = hash(key);
    if let Some(found) = cache.get(&hashed) {
        return Ok(Some(found));
    }
    let found = lookup(pool, key).await?;
    if let Some(found) = found {
        cache.put(hashed, found);
    }
    Ok(found)
}

/// Clears `cache` whenever any process revokes a key, until `cancel`; while not
/// listening (reconnecting), entries still expire after [`KEY_CACHE_TTL`].
pub async fn listen_for_revocations(
    pool: PgPool,
    cache: KeyCache,
    cancel: tokio_util::sync::CancellationToken,
) {
    while !cancel.is_cancelled() {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "key revocation listener cannot connect");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if let Err(e) = listener.listen(KEYS_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN for key revocations failed");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        // Revocations missed while not listening.
        cache.clear();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                message = listener.recv() => match message {
                    Ok(_) => cache.clear(),
                    Err(e) => {
                        tracing::warn!(error = %e, "key revocation listener lost its connection");
                        break;
                    }
                },
            }
        }
    }
}

/// When no key exists at all, creates an admin key and writes it to `<data_dir>/admin.key`
/// (mode 0600). Returns the file's path when it did. Safe with several processes starting
/// at once: the check and the creation hold one advisory lock.
pub async fn ensure_first_admin_key(
    pool: &PgPool,
    data_dir: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    use anyhow::Context;
    let mut tx = pool.begin().await?;
    sqlx::query!("SELECT pg_advisory_xact_lock(19532, 1)")
        .execute(&mut *tx)
        .await?;
    let any = sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM api_keys) AS "any!""#)
        .fetch_one(&mut *tx)
        .await?;
    if any {
        return Ok(None);
    }
    let (_, key) = insert_key(&mut tx, "first admin key", Scope::Admin).await?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join("admin.key");
    write_private(&path, &format!("{key}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    tx.commit().await?;
    Ok(Some(path))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open; make sure it is private.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

/// The live key `key` is, if any.
pub async fn lookup(pool: &PgPool, key: &str) -> Result<Option<ApiKey>, AppError> {
    let row = sqlx::query!(
        "SELECT id, scope FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash(key)
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let scope = Scope::parse(&row.scope)
        .ok_or_else(|| AppError::Internal(format!("api key with scope {:?}", row.scope)))?;
    Ok(Some(ApiKey { id: row.id, scope }))
}
