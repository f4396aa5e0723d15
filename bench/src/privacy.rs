//! `leadledger-bench privacy`: what encrypting personal data per contact costs — sealing
//! and opening one event in isolation, contact upserts over HTTP, a 10,000-row import, and
//! loading a contact of 10,000 events (from its snapshot, and replaying every event).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregates::contact::{Contact, ContactEvent, ContactFields, ContactFieldsInput};
use chacha20poly1305::KeyInit;
use chrono::Utc;
use leadledger::store::{Loaded, Metadata, Store};

use crate::measure::{ms, percentile};
use crate::{import, start};

/// Median time of `f` over `n` runs.
async fn median<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        f().await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(percentile(&times, 0.5))
}

fn sealing_cost() -> (Duration, Duration) {
    use projections::pii;
    let key = chacha20poly1305::XChaCha20Poly1305::new(&[7u8; 32].into());
    let payload = serde_json::json!({"ContactCreated": {
        "email": "ada.lovelace@bench.example.com",
        "fields": {"first_name": "Ada", "last_name": "Lovelace", "company": "Analytical Engines",
                   "custom": {"source": "list 1"}},
        "created_at": "2026-01-01T00:00:00Z"}});
    let rounds = 100_000u32;
    let write_key = pii::WriteKey::first(key.clone());
    let started = Instant::now();
    let mut sealed = payload.clone();
    for _ in 0..rounds {
        sealed = payload.clone();
        pii::seal_event(&write_key, "contact", "c", &mut sealed);
    }
    let seal = started.elapsed() / rounds;
    let keys = pii::Keys::with("c", key);
    let started = Instant::now();
    for _ in 0..rounds {
        let opened = pii::open_event(&keys, "contact", "c", sealed.clone()).expect("opens");
        assert_eq!(opened, payload);
    }
    (seal, started.elapsed() / rounds)
}

pub async fn run(seconds: u64, rows: usize) -> anyhow::Result<()> {
    let (seal, open) = sealing_cost();
    println!("## Personal data encryption\n");
    println!(
        "Sealing one `ContactCreated` (JSON split, XChaCha20-Poly1305, base64): {:.1} µs; \
         opening it: {:.1} µs (each includes cloning the JSON value).\n",
        seal.as_secs_f64() * 1e6,
        open.as_secs_f64() * 1e6
    );
    let server = Arc::new(start().await?);
    println!("| measurement | result |\n|---|---|");
    for clients in [1, 8] {
        crate::contacts::upserts(
            &server,
            clients,
            Duration::from_secs(1),
            &format!("w{clients}"),
        )
        .await?;
        let m = crate::contacts::upserts(
            &server,
            clients,
            Duration::from_secs(seconds),
            &format!("p{clients}"),
        )
        .await?;
        println!(
            "| contact upserts, {clients} client(s) | {:.0}/s (p50 {}, p99 {}) |",
            m.per_second(),
            ms(m.p50()),
            ms(m.p99())
        );
    }
    let mut imports = Vec::new();
    for run in 0..3 {
        let body = import::csv(rows, 0).replace("@example", &format!("@priv{run}-example"));
        let (took, report) = import::post(&server, "text/csv", body).await?;
        anyhow::ensure!(report["created"] == rows, "all rows created: {report}");
        imports.push(took);
    }
    imports.sort();
    println!(
        "| import of {rows} new contacts (median of 3) | {} |",
        ms(imports[1])
    );

    // One contact with 10,000 events, written straight through the store.
    let store = Store::default();
    let id = uuid::Uuid::new_v4().to_string();
    let email = aggregates::ContactEmail::parse("long.history@bench.example.com")?;
    let mut written = 0u64;
    while written < 10_000 {
        let mut tx = server.pool.begin().await?;
        let mut loaded: Loaded<Contact> = store.load(&mut tx, &id).await?;
        let events: Vec<ContactEvent> = (0..1_000)
            .map(|i| {
                let n = written + i;
                if n == 0 {
                    ContactEvent::ContactCreated {
                        email: email.clone(),
                        fields: ContactFields::default(),
                        created_at: Utc::now(),
                    }
                } else {
                    let fields = ContactFields::parse(ContactFieldsInput {
                        last_name: Some(format!("Name {n}")),
                        ..Default::default()
                    })
                    .expect("valid");
                    ContactEvent::ContactUpdated {
                        changes: fields,
                        updated_at: Utc::now(),
                    }
                }
            })
            .collect();
        for e in &events {
            cqrs_es::Aggregate::apply(&mut loaded.aggregate, e.clone());
        }
        store
            .append(&mut tx, &mut loaded, &events, &Metadata::default())
            .await?;
        tx.commit().await?;
        written += 1_000;
    }
    // The projections apply (and open) the 10,000 events just written: measure the loads
    // once they are done, not while they compete for the same cores.
    crate::store::wait_for_all_projections(&server).await?;
    let pool = server.pool.clone();
    let from_snapshot = median(50, || {
        let (pool, store, id) = (pool.clone(), store.clone(), id.clone());
        async move {
            let mut conn = pool.acquire().await?;
            let l: Loaded<Contact> = store.load(&mut conn, &id).await?;
            anyhow::ensure!(l.version == 10_000);
            Ok(())
        }
    })
    .await?;
    let replaying = Store::new(0);
    let full = median(5, || {
        let (pool, store, id) = (pool.clone(), replaying.clone(), id.clone());
        async move {
            let mut conn = pool.acquire().await?;
            let l: Loaded<Contact> = store.load(&mut conn, &id).await?;
            anyhow::ensure!(l.version == 10_000);
            Ok(())
        }
    })
    .await?;
    println!(
        "| load of a contact with 10,000 events, from its snapshot (median of 50) | {} |",
        ms(from_snapshot)
    );
    println!(
        "| load of a contact with 10,000 events, replaying all 10,000 sealed events (median of 5) | {} |",
        ms(full)
    );
    crate::stop(server).await
}
