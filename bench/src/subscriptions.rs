//! `leadledger-bench subscriptions`: outbound deliveries to a fast local receiver — events
//! per second when a backlog is replayed, and the lag from an event's commit to its arrival
//! at the receiver while events are written at a steady rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use leadledger::app::keys::{self, Scope};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::measure::{ms, percentile};
use crate::{Server, start_with};

/// What the receiver saw: each message id with the moment it arrived and the event's
/// commit time (the message's `timestamp`).
#[derive(Default)]
struct Seen {
    arrivals: HashMap<String, (SystemTime, Option<SystemTime>)>,
}

/// A minimal HTTP/1.1 receiver answering 200 at once (keep-alive, `Content-Length`).
async fn receiver() -> anyhow::Result<(String, Arc<Mutex<Seen>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, shared.clone()));
        }
    });
    Ok((url, seen))
}

async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Seen>>) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let arrived = SystemTime::now();
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let length: usize = header("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let id = header("webhook-id:").unwrap_or_default();
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Value =
            serde_json::from_slice(&buffer[head_end..head_end + length]).unwrap_or(Value::Null);
        buffer.drain(..head_end + length);
        let committed = body["timestamp"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(SystemTime::from);
        seen.lock()
            .unwrap()
            .arrivals
            .entry(id)
            .or_insert((arrived, committed));
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn admin_post(server: &Server, key: &str, path: &str, body: Value) -> anyhow::Result<Value> {
    Ok(server
        .client
        .post(format!("{}{path}", server.address))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn wait_for(seen: &Arc<Mutex<Seen>>, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while seen.lock().unwrap().arrivals.len() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "deliveries did not arrive in time"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

pub async fn run(events: usize, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let server = Arc::new(
        start_with(|app| {
            // The receiver is on loopback.
            app.outbound.allow_private = true;
        })
        .await?,
    );
    let (_, admin) = keys::create_key(&server.pool, "bench admin", Scope::Admin).await?;

    // Throughput: a backlog written first, then delivered from the start by a replay.
    println!("writing {events} events ...");
    let writers = 16;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..events).step_by(writers) {
                server.create_campaign(&format!("backlog {i}")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (url, seen) = receiver().await?;
    let sub = admin_post(&server, &admin, "/v1/subscriptions", json!({"url": url})).await?;
    let id = sub["id"].as_str().unwrap_or_default().to_string();
    let started = Instant::now();
    admin_post(
        &server,
        &admin,
        &format!("/v1/subscriptions/{id}/replay"),
        json!({"from_position": 0}),
    )
    .await?;
    wait_for(&seen, events, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    println!(
        "throughput: {events} events delivered in {:.2} s: {:.0} events/s (one subscription, in order)",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
    server
        .client
        .delete(format!("{}/v1/subscriptions/{id}", server.address))
        .bearer_auth(&admin)
        .send()
        .await?
        .error_for_status()?;

    // Lag: a new subscription (from now), events written at `rate` per second.
    let (url, seen) = receiver().await?;
    admin_post(&server, &admin, "/v1/subscriptions", json!({"url": url})).await?;
    let total = (rate * seconds) as usize;
    println!("writing {total} events at {rate}/s ...");
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writes = Vec::with_capacity(total);
    for i in 0..total {
        ticker.tick().await;
        let server = server.clone();
        writes.push(tokio::spawn(async move {
            let body: Value = server
                .client
                .post(format!("{}/v1/campaigns", server.address))
                .bearer_auth(&server.key)
                .json(&json!({"name": format!("lag {i}")}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            // The write's answer, after its commit, and its message id (`evt_<position>`).
            let acknowledged = SystemTime::now();
            let position = body["position"].as_str().unwrap_or_default();
            let number = position.rsplit('-').next().unwrap_or_default().to_string();
            anyhow::Ok((format!("evt_{number}"), acknowledged))
        }));
    }
    let mut acknowledged = Vec::with_capacity(total);
    for w in writes {
        acknowledged.push(w.await??);
    }
    wait_for(&seen, total, Duration::from_secs(120)).await?;
    let mut lags: Vec<Duration> = seen
        .lock()
        .unwrap()
        .arrivals
        .values()
        .filter_map(|(arrived, committed)| arrived.duration_since((*committed)?).ok())
        .collect();
    lags.sort_unstable();
    println!(
        "lag at {rate} events/s over {} events, from the writing transaction's start: p50 {}, p99 {}, max {}",
        lags.len(),
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.99)),
        ms(*lags.last().unwrap_or(&Duration::ZERO)),
    );
    // From the write's answer (its commit is done) to the arrival: a message that arrived
    // before the writer got its answer counts as zero.
    let mut after_ack: Vec<Duration> = {
        let seen = seen.lock().unwrap();
        acknowledged
            .iter()
            .filter_map(|(id, acked)| {
                let (arrived, _) = seen.arrivals.get(id)?;
                Some(arrived.duration_since(*acked).unwrap_or_default())
            })
            .collect()
    };
    after_ack.sort_unstable();
    println!(
        "lag from the write's answer over {} events: p50 {}, p99 {}, max {}",
        after_ack.len(),
        ms(percentile(&after_ack, 0.5)),
        ms(percentile(&after_ack, 0.99)),
        ms(*after_ack.last().unwrap_or(&Duration::ZERO)),
    );
    println!(
        "load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    crate::stop(server).await
}
