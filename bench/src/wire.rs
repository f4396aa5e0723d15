//! The HTTP client of the closed-loop command measurements: one keep-alive HTTP/1.1
//! connection per client, on hyper's connection API, driven by the client's own task.
//!
//! The floor (pgbench, in C) and the peer (in-process, no HTTP at all) spend next to
//! nothing on their side of the measurement, while the client and the server share the
//! machine's cores. A general client (`reqwest`: a pool of connections, each driven by a
//! task of its own that every request is handed to and its answer handed back from) spends
//! about a tenth of a command's CPU on the machine of BENCHMARKS.md. This one sends each
//! request and reads its whole answer in the task that asked, so the figures measure the
//! server rather than the client.

use std::future::Future;
use std::pin::pin;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{Connection, SendRequest, handshake};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// A request not answered within this long fails, and its connection is dropped.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

type Conn = (
    SendRequest<Full<Bytes>>,
    Connection<TokioIo<TcpStream>, Full<Bytes>>,
);

/// Connections to one server, one for each of `clients` clients; client `i` only ever
/// uses connection `i`, so no two requests share one.
pub struct Wire {
    /// `host:port`, to connect to and to send as `Host`.
    authority: String,
    host: HeaderValue,
    bearer: HeaderValue,
    connections: Vec<Mutex<Option<Conn>>>,
}

impl Wire {
    /// `base` is the server's `http://host:port`; `key` an API key sent as a bearer token.
    pub fn new(base: &str, key: &str, clients: usize) -> anyhow::Result<Self> {
        let uri: Uri = base.parse().context("the server's address")?;
        let authority = uri
            .authority()
            .context("the server's address has no host")?
            .to_string();
        Ok(Self {
            host: HeaderValue::from_str(&authority)?,
            bearer: HeaderValue::from_str(&format!("Bearer {key}"))?,
            authority,
            connections: (0..clients).map(|_| Mutex::new(None)).collect(),
        })
    }

    /// `POST path` with a JSON `body` and the extra `headers`, as client `client`; the
    /// answer's status and whole body.
    pub async fn post_json(
        &self,
        client: usize,
        path: &str,
        headers: &[(&'static str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.bearer.clone())
            .header(CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let mut slot = self.connections[client].lock().await;
        if slot.as_ref().is_none_or(|(sender, _)| sender.is_closed()) {
            let stream = TcpStream::connect(&self.authority).await?;
            stream.set_nodelay(true)?;
            *slot = Some(handshake(TokioIo::new(stream)).await?);
        }
        let (sender, connection) = slot.as_mut().expect("connected above");
        let answered = tokio::time::timeout(ANSWER_WITHIN, async {
            driving(connection, sender.ready())
                .await?
                .context("the connection closed")?;
            let response = driving(connection, sender.send_request(request)).await?;
            let response = response.context("the connection closed before the answer")?;
            let status = response.status();
            driving(connection, response.into_body().collect())
                .await?
                .context("the connection closed while reading the answer")
                .map(|body| (status, body.to_bytes()))
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {ANSWER_WITHIN:?}")));
        if answered.is_err() {
            *slot = None;
        }
        answered
    }
}

/// Runs `work` while driving `connection`, which does the reading and writing for it.
/// `Ok(None)` if the connection ended first.
async fn driving<T, E>(
    connection: &mut Connection<TokioIo<TcpStream>, Full<Bytes>>,
    work: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<Option<T>>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut work = pin!(work);
    tokio::select! {
        biased;
        done = &mut work => Ok(Some(done?)),
        ended = connection => {
            ended?;
            Ok(None)
        }
    }
}
