//! Contact upserts over HTTP: `POST /v1/contacts` with a new email and a new
//! `Idempotency-Key` each time, so every request is the full command path (load an empty
//! stream, handle, append `ContactCreated`, record the idempotent response, commit).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aggregates::contact::{ContactCommand, ContactEmail};
use chrono::{DateTime, Utc};
use leadledger::app::contacts::ContactInput;
use serde_json::{Value, json};

use crate::Server;
use crate::measure::{Measured, Outcome, closed_loop};
use crate::wire::Wire;

/// The body of upsert `n` of the series `tag`; the peer builds its command from the same.
pub fn body(tag: &str, n: u64) -> Value {
    json!({
        "email": email(tag, n),
        "first_name": "Ada",
        "last_name": format!("Lovelace {n}"),
        "company": "Analytical Engines",
    })
}

pub fn email(tag: &str, n: u64) -> String {
    format!("{tag}-{n}@bench.example.com")
}

/// Upserts new contacts from `clients` concurrent clients for `duration`. `tag` keeps the
/// emails of different series apart.
pub async fn upserts(
    server: &Arc<Server>,
    clients: usize,
    duration: Duration,
    tag: &str,
) -> anyhow::Result<Measured> {
    let next = Arc::new(AtomicU64::new(0));
    let wire = Arc::new(Wire::new(&server.address, &server.key, clients)?);
    let tag = tag.to_string();
    closed_loop(clients, duration, move |client| {
        let wire = wire.clone();
        let n = next.fetch_add(1, Ordering::Relaxed);
        let tag = tag.clone();
        async move {
            let key = format!("{tag}-{n}");
            // The whole answer is read, as a real client would.
            let (status, _) = wire
                .post_json(
                    client,
                    "/v1/contacts",
                    &[("idempotency-key", &key)],
                    serde_json::to_vec(&body(&tag, n))?,
                )
                .await?;
            Ok(if status == 201 {
                Outcome::Done(1)
            } else {
                Outcome::Failed(status.as_str().to_string())
            })
        }
    })
    .await
}

/// Upsert `n` of the series `tag` as the aggregate's command, parsed as the server parses
/// the HTTP body; with the email, which the contact's id derives from.
pub fn command(
    tag: &str,
    n: u64,
    at: DateTime<Utc>,
) -> anyhow::Result<(ContactEmail, ContactCommand)> {
    let input: ContactInput = serde_json::from_value(body(tag, n))?;
    let (email, fields) = input
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid contact: {e:?}"))?;
    let command = ContactCommand::Upsert {
        email: email.clone(),
        fields,
        at,
    };
    Ok((email, command))
}
