//! Webhook sources: their kind and credentials (sealed at rest under the server's secret
//! key, shown once), creation, rotation with a grace period, and the list.
//!
//! Credentials the server makes (a Standard Webhooks secret, Postmark's Basic
//! credentials, tokens) are shown in the answer that makes them, and again only to a
//! retry with the same `Idempotency-Key`: the recorded answer keeps them sealed. Keys the
//! user gives (SendGrid's public key, Mailgun's signing key) are never shown back.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeDelta, Utc};
use http::StatusCode;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::{PgConnection, PgPool};

use aggregates::enrollment::is_source_name;

use crate::app::App;
use crate::app::command::{self, Answer, CommandContext, Recorded, Reply};
use crate::app::error::{AppError, FieldError};
use crate::providers::{
    AuthError, Authenticated, Credentials, CustomMapping, Delivery, SourceKind,
    sendgrid_public_key_der, standard_key,
};
use crate::secrets::SecretBox;

/// How long a rotated-out credential is still accepted: long enough to change it at the
/// provider without losing a delivery in between, and to let retries of deliveries
/// signed before the change arrive.
pub const ROTATION_GRACE: TimeDelta = TimeDelta::hours(24);
/// The longest Mailgun signing key taken (Mailgun's are 32 hex digits or `key-` + 32).
const MAX_SIGNING_KEY_CHARS: usize = 256;
/// The longest public key text taken (a P-256 key is 91 bytes of DER, 124 in base64).
const MAX_PUBLIC_KEY_CHARS: usize = 4096;

/// Refuses a name no source may have (422).
pub fn check_source_name(name: &str) -> Result<(), AppError> {
    if is_source_name(name) {
        Ok(())
    } else {
        Err(AppError::invalid(vec![FieldError::new(
            "name",
            "must be 1 to 63 characters of a-z, 0-9, _ and -, starting with a letter or digit",
        )]))
    }
}

/// A source to create, as asked.
#[derive(Debug, Clone)]
pub struct NewSource {
    pub name: String,
    pub kind: SourceKind,
    /// `sendgrid`: the verification key (base64 DER, or PEM).
    pub public_key: Option<String>,
    /// `mailgun`: the HTTP webhook signing key.
    pub signing_key: Option<String>,
    /// `custom`: the mapping.
    pub mapping: Option<Value>,
}

/// A new credential for a rotation: the key for the kinds whose key the user gives.
#[derive(Debug, Clone, Default)]
pub struct NewCredential {
    pub public_key: Option<String>,
    pub signing_key: Option<String>,
}

/// A random secret of 32 bytes, as URL-safe text (it goes in URLs and headers as is).
fn random_text(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Refuses a member that does not belong to a kind (422), so a misplaced key is not
/// silently dropped.
fn only_for(kind: SourceKind, field: &str, given: bool, owner: SourceKind) -> Option<FieldError> {
    (given && kind != owner)
        .then(|| FieldError::new(field, format!("is only for {owner} sources, not {kind}")))
}

/// The credentials of a `kind` source: made by the server, or read from what the user
/// gives; with the members shown once (an empty map when the user gave the key).
/// `mapping` is a custom source's (kept across rotations).
fn credentials(
    kind: SourceKind,
    given: &NewCredential,
    mapping: Option<CustomMapping>,
) -> Result<(Credentials, Map<String, Value>), AppError> {
    let mut errors: Vec<FieldError> = [
        only_for(
            kind,
            "public_key",
            given.public_key.is_some(),
            SourceKind::Sendgrid,
        ),
        only_for(
            kind,
            "signing_key",
            given.signing_key.is_some(),
            SourceKind::Mailgun,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut shown = Map::new();
    let credentials = match kind {
        SourceKind::Standard => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            shown.insert(
                "secret".into(),
                json!(format!("whsec_{}", STANDARD.encode(key))),
            );
            Some(Credentials::Standard { key: key.to_vec() })
        }
        SourceKind::Sendgrid => match given.public_key.as_deref() {
            None => {
                errors.push(FieldError::new(
                    "public_key",
                    "is required: the verification key SendGrid shows for the Event Webhook",
                ));
                None
            }
            Some(text) if text.len() > MAX_PUBLIC_KEY_CHARS => {
                errors.push(FieldError::new("public_key", "is too long for a P-256 key"));
                None
            }
            Some(text) => match sendgrid_public_key_der(text) {
                Ok(public_key_der) => Some(Credentials::Sendgrid { public_key_der }),
                Err(reason) => {
                    errors.push(FieldError::new("public_key", reason));
                    None
                }
            },
        },
        SourceKind::Mailgun => match given.signing_key.as_deref().map(str::trim) {
            Some(key)
                if !key.is_empty()
                    && key.len() <= MAX_SIGNING_KEY_CHARS
                    && key.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some(Credentials::Mailgun {
                    signing_key: key.to_string(),
                })
            }
            _ => {
                errors.push(FieldError::new(
                    "signing_key",
                    "is required: Mailgun's HTTP webhook signing key, 1 to 256 visible ASCII characters",
                ));
                None
            }
        },
        SourceKind::Postmark => {
            let username = random_text("postmark-")[..21].to_string();
            let password = random_text("");
            shown.insert("username".into(), json!(username));
            shown.insert("password".into(), json!(password));
            Some(Credentials::Postmark { username, password })
        }
        SourceKind::Instantly | SourceKind::Smartlead | SourceKind::Custom => {
            let token = random_text("llt_");
            shown.insert("token".into(), json!(token));
            match kind {
                SourceKind::Instantly => Some(Credentials::Instantly { token }),
                SourceKind::Smartlead => Some(Credentials::Smartlead { token }),
                _ => mapping.map(|mapping| Credentials::Custom { token, mapping }),
            }
        }
    };
    match credentials {
        Some(c) if errors.is_empty() => Ok((c, shown)),
        _ => Err(AppError::invalid(errors)),
    }
}

/// How credentials other than a Standard secret are sealed: a JSON document.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stored {
    Sendgrid {
        public_key_der: String,
    },
    Mailgun {
        signing_key: String,
    },
    Postmark {
        username: String,
        password: String,
    },
    Instantly {
        token: String,
    },
    Smartlead {
        token: String,
    },
    Custom {
        token: String,
        mapping: CustomMapping,
    },
}

/// The sealed text of `credentials`: a Standard source's `whsec_` secret (as sources
/// made before kinds existed keep it), else the JSON of [`Stored`].
fn sealed_text(credentials: &Credentials) -> String {
    let stored = match credentials.clone() {
        Credentials::Standard { key } => return format!("whsec_{}", STANDARD.encode(key)),
        Credentials::Sendgrid { public_key_der } => Stored::Sendgrid {
            public_key_der: STANDARD.encode(public_key_der),
        },
        Credentials::Mailgun { signing_key } => Stored::Mailgun { signing_key },
        Credentials::Postmark { username, password } => Stored::Postmark { username, password },
        Credentials::Instantly { token } => Stored::Instantly { token },
        Credentials::Smartlead { token } => Stored::Smartlead { token },
        Credentials::Custom { token, mapping } => Stored::Custom { token, mapping },
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

fn seal(secrets: &SecretBox, credentials: &Credentials) -> (Vec<u8>, Vec<u8>) {
    secrets.seal(sealed_text(credentials).as_bytes())
}

fn open(
    secrets: &SecretBox,
    kind: SourceKind,
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<Credentials, AppError> {
    let broken = |what: &str| AppError::Internal(format!("a webhook source's {what}"));
    let text = secrets
        .open(nonce, ciphertext)
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let text = String::from_utf8(text).map_err(|_| broken("credentials are not text"))?;
    let credentials = if kind == SourceKind::Standard {
        Credentials::Standard {
            key: standard_key(&text).map_err(AppError::Internal)?,
        }
    } else {
        match serde_json::from_str::<Stored>(&text)
            .map_err(|_| broken("credentials do not read"))?
        {
            Stored::Sendgrid { public_key_der } => Credentials::Sendgrid {
                public_key_der: STANDARD
                    .decode(public_key_der)
                    .map_err(|_| broken("public key does not read"))?,
            },
            Stored::Mailgun { signing_key } => Credentials::Mailgun { signing_key },
            Stored::Postmark { username, password } => Credentials::Postmark { username, password },
            Stored::Instantly { token } => Credentials::Instantly { token },
            Stored::Smartlead { token } => Credentials::Smartlead { token },
            Stored::Custom { token, mapping } => Credentials::Custom { token, mapping },
        }
    };
    if credentials.kind() != kind {
        return Err(broken("credentials are for another kind"));
    }
    Ok(credentials)
}

/// A source as deliveries see it.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub kind: SourceKind,
    pub current: Credentials,
    /// The credential a rotation replaced, while its grace period lasts.
    pub previous: Option<Credentials>,
}

impl Source {
    /// Authenticates a delivery with the current credential, or the previous one during
    /// a rotation's grace period. The refusal is the current credential's.
    pub fn authenticate(&self, delivery: &Delivery<'_>) -> Result<Authenticated, AuthError> {
        match crate::providers::authenticate(self.kind, &self.current, delivery) {
            Ok(done) => Ok(done),
            Err(refused) => self
                .previous
                .as_ref()
                .and_then(|p| crate::providers::authenticate(self.kind, p, delivery).ok())
                .ok_or(refused),
        }
    }
}

/// The source `name` with its credentials opened, or `None` when there is none.
pub async fn load(
    pool: &PgPool,
    secrets: &SecretBox,
    name: &str,
) -> Result<Option<Source>, AppError> {
    // No source has another name; and a name from the URL may hold what PostgreSQL
    // cannot take as text (NUL).
    if !is_source_name(name) {
        return Ok(None);
    }
    let Some(row) = sqlx::query!(
        r#"SELECT kind, secret_nonce, secret_ciphertext,
                  previous_nonce, previous_ciphertext,
                  (previous_expires_at > now()) AS "previous_valid?"
           FROM webhook_sources WHERE name = $1"#,
        name
    )
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let kind = SourceKind::parse(&row.kind)
        .ok_or_else(|| AppError::Internal(format!("unknown source kind {:?}", row.kind)))?;
    let current = open(secrets, kind, &row.secret_nonce, &row.secret_ciphertext)?;
    let previous = match (
        row.previous_valid,
        row.previous_nonce,
        row.previous_ciphertext,
    ) {
        (Some(true), Some(nonce), Some(ciphertext)) => {
            Some(open(secrets, kind, &nonce, &ciphertext)?)
        }
        _ => None,
    };
    Ok(Some(Source {
        name: name.to_string(),
        kind,
        current,
        previous,
    }))
}

/// Checks a new source and its credentials: the answer's shown members, and what to store.
fn prepare(new: &NewSource) -> Result<(Credentials, Map<String, Value>), AppError> {
    check_source_name(&new.name)?;
    let mapping = match (new.kind, &new.mapping) {
        (SourceKind::Custom, Some(value)) => {
            Some(CustomMapping::parse(value).map_err(|errors| {
                AppError::invalid(
                    errors
                        .into_iter()
                        .map(|(field, message)| FieldError::new(field, message))
                        .collect(),
                )
            })?)
        }
        (SourceKind::Custom, None) => {
            return Err(AppError::invalid(vec![FieldError::new(
                "mapping",
                "is required for a custom source",
            )]));
        }
        (_, Some(_)) => {
            return Err(AppError::invalid(vec![FieldError::new(
                "mapping",
                format!("is only for custom sources, not {}", new.kind),
            )]));
        }
        (_, None) => None,
    };
    credentials(
        new.kind,
        &NewCredential {
            public_key: new.public_key.clone(),
            signing_key: new.signing_key.clone(),
        },
        mapping,
    )
}

/// Inserts a checked source on `conn`; 409 when the name is taken.
async fn insert(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    name: &str,
    credentials: &Credentials,
) -> Result<(), AppError> {
    let (nonce, sealed) = seal(secrets, credentials);
    let inserted = sqlx::query!(
        "INSERT INTO webhook_sources (name, kind, secret_nonce, secret_ciphertext)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO NOTHING",
        name,
        credentials.kind().as_str(),
        nonce,
        sealed
    )
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(AppError::conflict(
            "already-exists",
            "a webhook source with this name exists",
        ));
    }
    Ok(())
}

/// Creates a source on `conn` (for the command line); returns the members shown once.
pub async fn add_source(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    new: &NewSource,
) -> Result<Map<String, Value>, AppError> {
    let (credentials, shown) = prepare(new)?;
    insert(conn, secrets, &new.name, &credentials).await?;
    Ok(shown)
}

/// The member of a recorded answer that holds the credentials shown once, sealed: the
/// idempotency record never holds them in plaintext.
const SEALED: &str = "credentials_sealed";
/// As [`SEALED`], in answers recorded before sources had kinds: the `whsec_` secret alone.
const SEALED_SECRET: &str = "secret_sealed";

fn seal_text(app: &App, text: &str) -> String {
    let (nonce, sealed) = app.secrets.seal(text.as_bytes());
    format!("{}.{}", STANDARD.encode(nonce), STANDARD.encode(sealed))
}

fn open_text(app: &App, sealed: &Value) -> Result<String, AppError> {
    let broken =
        || AppError::Internal("recorded webhook-source credentials cannot be opened".into());
    let (nonce, sealed) = sealed
        .as_str()
        .unwrap_or_default()
        .split_once('.')
        .ok_or_else(broken)?;
    let nonce = STANDARD.decode(nonce).map_err(|_| broken())?;
    let sealed = STANDARD.decode(sealed).map_err(|_| broken())?;
    let text = app
        .secrets
        .open(&nonce, &sealed)
        .map_err(|e| AppError::Internal(e.to_string()))?;
    String::from_utf8(text).map_err(|_| broken())
}

/// A recorded answer replayed, its sealed credentials opened back into it.
async fn replay(
    app: &App,
    conn: &mut PgConnection,
    context: &CommandContext,
) -> Result<Option<Recorded>, AppError> {
    let Some(mut recorded) = command::replay(conn, context).await? else {
        return Ok(None);
    };
    if let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&recorded.body) {
        if let Some(sealed) = body.remove(SEALED) {
            let shown: Map<String, Value> = serde_json::from_str(&open_text(app, &sealed)?)
                .map_err(|e| AppError::Internal(e.to_string()))?;
            body.extend(shown);
        } else if let Some(sealed) = body.remove(SEALED_SECRET) {
            body.insert("secret".into(), Value::String(open_text(app, &sealed)?));
        }
        recorded.body = serde_json::to_vec(&body).unwrap_or_default();
    }
    Ok(Some(recorded))
}

/// Records `public` with `shown` sealed into it, and answers `public` with `shown` in the
/// clear.
async fn record_sealed(
    app: &App,
    conn: &mut PgConnection,
    context: &CommandContext,
    status: StatusCode,
    public: Map<String, Value>,
    shown: Map<String, Value>,
) -> Result<Reply, AppError> {
    let mut recorded = public.clone();
    if !shown.is_empty() {
        recorded.insert(
            SEALED.into(),
            json!(seal_text(app, &Value::Object(shown.clone()).to_string())),
        );
    }
    command::record(
        conn,
        context,
        &Reply::ok(Value::Object(recorded)).with_status(status),
    )
    .await?;
    let mut answer = public;
    answer.extend(shown);
    Ok(Reply::ok(Value::Object(answer)).with_status(status))
}

/// Creates a source and its credentials, honouring the idempotency key: a retry gets the
/// same answer, credentials included, and makes nothing new. A name taken is answered as
/// `refusal` renders it, and recorded so.
pub async fn create_source(
    app: &App,
    context: &CommandContext,
    new: &NewSource,
    refusal: impl Fn(AppError) -> Reply,
) -> Result<Answer, AppError> {
    let (credentials, shown) = prepare(new)?;
    let mut tx = app.pool.begin().await?;
    if let Some(recorded) = replay(app, &mut tx, context).await? {
        tx.commit().await?;
        return Ok(Answer::Replayed(recorded));
    }
    let reply = match insert(&mut tx, &app.secrets, &new.name, &credentials).await {
        Ok(()) => {
            let public = json!({
                "name": new.name,
                "kind": new.kind.as_str(),
                "url": format!("/webhooks/{}", new.name),
            });
            let Value::Object(public) = public else {
                unreachable!("an object")
            };
            record_sealed(app, &mut tx, context, StatusCode::CREATED, public, shown).await?
        }
        Err(e @ AppError::Conflict { .. }) => {
            let reply = refusal(e);
            command::record(&mut tx, context, &reply).await?;
            reply
        }
        Err(e) => return Err(e),
    };
    tx.commit().await?;
    Ok(Answer::Fresh(reply))
}

/// Gives source `name` a new credential (made by the server, or the key given for
/// SendGrid and Mailgun); the one it replaces is still accepted for [`ROTATION_GRACE`]
/// (the one before that, if still in its grace, no longer). Honours the idempotency key
/// as [`create_source`] does.
pub async fn rotate_source(
    app: &App,
    context: &CommandContext,
    name: &str,
    given: &NewCredential,
) -> Result<Answer, AppError> {
    let missing = || AppError::NotFound("no webhook source with this name".into());
    if !is_source_name(name) {
        return Err(missing());
    }
    let mut tx = app.pool.begin().await?;
    if let Some(recorded) = replay(app, &mut tx, context).await? {
        tx.commit().await?;
        return Ok(Answer::Replayed(recorded));
    }
    let row = sqlx::query!(
        "SELECT kind, secret_nonce, secret_ciphertext FROM webhook_sources
         WHERE name = $1 FOR UPDATE",
        name
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(missing)?;
    let kind = SourceKind::parse(&row.kind)
        .ok_or_else(|| AppError::Internal(format!("unknown source kind {:?}", row.kind)))?;
    let mapping = match open(
        &app.secrets,
        kind,
        &row.secret_nonce,
        &row.secret_ciphertext,
    )? {
        Credentials::Custom { mapping, .. } => Some(mapping),
        _ => None,
    };
    let (credentials, shown) = credentials(kind, given, mapping)?;
    let (nonce, sealed) = seal(&app.secrets, &credentials);
    let grace = ROTATION_GRACE.num_seconds() as f64;
    let until: DateTime<Utc> = sqlx::query_scalar!(
        r#"UPDATE webhook_sources
           SET previous_nonce = secret_nonce, previous_ciphertext = secret_ciphertext,
               previous_expires_at = now() + make_interval(secs => $4),
               secret_nonce = $2, secret_ciphertext = $3, rotated_at = now()
           WHERE name = $1
           RETURNING previous_expires_at AS "until!""#,
        name,
        nonce,
        sealed,
        grace
    )
    .fetch_one(&mut *tx)
    .await?;
    let public = json!({
        "name": name,
        "kind": kind.as_str(),
        "previous_valid_until": until,
    });
    let Value::Object(public) = public else {
        unreachable!("an object")
    };
    let reply = record_sealed(app, &mut tx, context, StatusCode::OK, public, shown).await?;
    tx.commit().await?;
    Ok(Answer::Fresh(reply))
}

/// A source as listed: never a credential.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SourceSummary {
    pub name: String,
    /// How deliveries are authenticated and read: `standard`, `sendgrid`, `mailgun`,
    /// `postmark`, `instantly`, `smartlead` or `custom`.
    pub kind: String,
    pub created_at: DateTime<Utc>,
    /// When the credential was last rotated; null if never.
    pub rotated_at: Option<DateTime<Utc>>,
    /// Until when the credential replaced by the last rotation is still accepted.
    pub previous_valid_until: Option<DateTime<Utc>>,
    /// When the last delivery was accepted; null before the first.
    pub last_delivery_at: Option<DateTime<Utc>>,
    /// Events by outcome over every delivery accepted (a repeated delivery counts once).
    pub counts: OutcomeCounts,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct OutcomeCounts {
    pub applied: i64,
    pub duplicate: i64,
    pub parked: i64,
    pub rejected: i64,
    /// Events of a type that carries no milestone.
    pub ignored: i64,
}

/// Sources by name, after `after`. The counts are sums of the per-outcome counts each
/// delivery records with itself (one row per accepted delivery), read by an index on the
/// source.
pub async fn list_sources(
    pool: &PgPool,
    after: Option<String>,
    limit: i64,
) -> Result<Vec<SourceSummary>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT s.name, s.kind, s.created_at, s.rotated_at,
                  CASE WHEN s.previous_expires_at > now() THEN s.previous_expires_at END
                      AS previous_valid_until,
                  d.last_delivery_at,
                  coalesce(d.applied, 0) AS "applied!", coalesce(d.duplicate, 0) AS "duplicate!",
                  coalesce(d.parked, 0) AS "parked!", coalesce(d.rejected, 0) AS "rejected!",
                  coalesce(d.ignored, 0) AS "ignored!"
           FROM webhook_sources s
           LEFT JOIN LATERAL (
               SELECT max(w.created_at) AS last_delivery_at,
                      sum(w.applied)::bigint AS applied, sum(w.duplicate)::bigint AS duplicate,
                      sum(w.parked)::bigint AS parked, sum(w.rejected)::bigint AS rejected,
                      sum(w.ignored)::bigint AS ignored
               FROM webhook_deliveries w WHERE w.source = s.name
           ) d ON true
           WHERE $1::text IS NULL OR s.name > $1
           ORDER BY s.name
           LIMIT $2"#,
        after,
        limit
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| SourceSummary {
            name: r.name,
            kind: r.kind,
            created_at: r.created_at,
            rotated_at: r.rotated_at,
            previous_valid_until: r.previous_valid_until,
            last_delivery_at: r.last_delivery_at,
            counts: OutcomeCounts {
                applied: r.applied,
                duplicate: r.duplicate,
                parked: r.parked,
                rejected: r.rejected,
                ignored: r.ignored,
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_seals_and_opens_to_the_same_credentials() {
        let secrets = SecretBox::ephemeral();
        let mapping = CustomMapping::parse(&json!({
            "id": "/id", "type": "/type", "email": "/email", "occurred_at": "/at",
            "campaign": "/campaign", "types": {"sent": "sent"}
        }))
        .unwrap();
        let der = crate::providers::sendgrid_public_key_der(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==",
        )
        .unwrap();
        for (kind, given, mapping) in [
            (SourceKind::Standard, NewCredential::default(), None),
            (
                SourceKind::Sendgrid,
                NewCredential {
                    public_key: Some(STANDARD.encode(&der)),
                    ..Default::default()
                },
                None,
            ),
            (
                SourceKind::Mailgun,
                NewCredential {
                    signing_key: Some("key-0123456789abcdef".into()),
                    ..Default::default()
                },
                None,
            ),
            (SourceKind::Postmark, NewCredential::default(), None),
            (SourceKind::Instantly, NewCredential::default(), None),
            (SourceKind::Smartlead, NewCredential::default(), None),
            (SourceKind::Custom, NewCredential::default(), Some(mapping)),
        ] {
            let (made, _) = credentials(kind, &given, mapping).unwrap();
            let (nonce, sealed) = seal(&secrets, &made);
            assert!(
                !String::from_utf8_lossy(&sealed).contains("key-0123"),
                "sealed, not plain"
            );
            assert_eq!(
                open(&secrets, kind, &nonce, &sealed).unwrap(),
                made,
                "{kind}"
            );
        }
    }

    #[test]
    fn a_key_given_to_a_kind_that_takes_none_is_refused() {
        let refused = credentials(
            SourceKind::Postmark,
            &NewCredential {
                signing_key: Some("k".into()),
                ..Default::default()
            },
            None,
        );
        assert!(
            matches!(refused, Err(AppError::Unprocessable { .. })),
            "{refused:?}"
        );
        let refused = credentials(SourceKind::Sendgrid, &NewCredential::default(), None);
        assert!(
            matches!(refused, Err(AppError::Unprocessable { .. })),
            "{refused:?}"
        );
    }
}
