//! Outbound HTTP to subscribers' URLs, safe against server-side request forgery: `https`
//! only, no redirects, no proxies, connect and total timeouts, bounded response reads,
//! and every address checked — IP literals before sending, names by a resolver that drops
//! loopback, private, link-local, CGNAT, unique-local, multicast, unspecified, reserved
//! and metadata addresses, so that the connection goes to an address that was checked.
//! `LEADLEDGER_OUTBOUND_ALLOW_PRIVATE=true` allows those addresses and plain `http`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::Mac;

/// What outbound deliveries may reach and how long they may take.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Allows private and loopback addresses, and plain `http`.
    pub allow_private: bool,
    pub connect_timeout: Duration,
    /// The longest one attempt may take, response included.
    pub timeout: Duration,
    /// Multiplies the retry schedule and the breaker's cool-down (tests and benchmarks
    /// shorten them; 1.0 in production).
    pub retry_scale: f64,
    /// Consecutive failures at one host that open its breaker.
    pub breaker_threshold: i32,
    /// How long an open breaker waits before one probe (before `retry_scale`).
    pub breaker_cooldown: Duration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            retry_scale: 1.0,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(60),
        }
    }
}

impl OutboundConfig {
    /// The defaults, changed by `LEADLEDGER_OUTBOUND_ALLOW_PRIVATE`,
    /// `LEADLEDGER_OUTBOUND_TIMEOUT_MS`, `LEADLEDGER_SUBSCRIPTION_RETRY_SCALE`,
    /// `LEADLEDGER_OUTBOUND_BREAKER_THRESHOLD` and `LEADLEDGER_OUTBOUND_BREAKER_COOLDOWN_MS`.
    /// A value that does not parse is ignored with a warning.
    pub fn from_env() -> Self {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            let text = std::env::var(name).ok()?;
            let parsed = text.trim().parse().ok();
            if parsed.is_none() {
                tracing::warn!(variable = name, "ignored: the value does not parse");
            }
            parsed
        }
        let mut config = Self::default();
        if let Some(allow) = var::<bool>("LEADLEDGER_OUTBOUND_ALLOW_PRIVATE") {
            config.allow_private = allow;
        }
        if let Some(ms) = var::<u64>("LEADLEDGER_OUTBOUND_TIMEOUT_MS") {
            config.timeout = Duration::from_millis(ms.max(1));
            config.connect_timeout = config.connect_timeout.min(config.timeout);
        }
        if let Some(scale) = var::<f64>("LEADLEDGER_SUBSCRIPTION_RETRY_SCALE")
            && scale.is_finite()
            && scale > 0.0
        {
            config.retry_scale = scale;
        }
        if let Some(n) = var::<i32>("LEADLEDGER_OUTBOUND_BREAKER_THRESHOLD") {
            config.breaker_threshold = n.max(1);
        }
        if let Some(ms) = var::<u64>("LEADLEDGER_OUTBOUND_BREAKER_COOLDOWN_MS") {
            config.breaker_cooldown = Duration::from_millis(ms);
        }
        config
    }

    /// `d` times the retry scale.
    pub fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.retry_scale)
    }
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("must be an absolute URL")]
    Unparsable,
    #[error("must use https")]
    Scheme,
    #[error("must name a host")]
    NoHost,
    #[error("must not carry credentials")]
    Credentials,
    #[error("must not have a fragment")]
    Fragment,
    #[error("must not be a loopback, private, link-local or metadata address")]
    PrivateAddress,
}

/// Checks a subscriber URL: scheme, host, no credentials, and an IP literal against the
/// refused ranges. Names are checked when they are resolved, at each attempt.
pub fn check_target(text: &str, allow_private: bool) -> Result<reqwest::Url, TargetError> {
    let url = reqwest::Url::parse(text.trim()).map_err(|_| TargetError::Unparsable)?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        _ => return Err(TargetError::Scheme),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Credentials);
    }
    if url.fragment().is_some() {
        return Err(TargetError::Fragment);
    }
    match url.host() {
        None => Err(TargetError::NoHost),
        Some(url::Host::Domain("")) => Err(TargetError::NoHost),
        Some(url::Host::Ipv4(ip)) if !allow_private && !is_public(IpAddr::V4(ip)) => {
            Err(TargetError::PrivateAddress)
        }
        Some(url::Host::Ipv6(ip)) if !allow_private && !is_public(IpAddr::V6(ip)) => {
            Err(TargetError::PrivateAddress)
        }
        Some(_) => Ok(url),
    }
}

/// The host a breaker is kept for: the URL's host and port.
pub fn breaker_host(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

/// Whether `ip` may be reached from the internet side: not loopback, private (RFC 1918),
/// CGNAT (100.64/10), link-local (incl. 169.254.169.254), unique-local (fc00::/7, incl.
/// fd00:ec2::254), multicast, unspecified, broadcast, documentation, benchmarking or
/// reserved; IPv4 embedded in IPv6 (mapped, compatible, NAT64, 6to4) is judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // this network, unspecified
        || a == 10                             // private
        || a == 127                            // loopback
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || (a == 169 && b == 254)              // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // documentation
        || (a == 192 && b == 168)              // private
        || (a == 198 && (b == 18 || b == 19))  // benchmarking
        || (a == 198 && b == 51 && c == 100)   // documentation
        || (a == 203 && b == 0 && c == 113)    // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96).
    if s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        if ip.is_unspecified() || ip.is_loopback() {
            return false;
        }
        let [_, _, _, _, _, _, hi, lo] = s;
        return is_public_v4(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        ));
    }
    // 6to4 (2002::/16) carries an IPv4 address in its next 32 bits.
    if s[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00   // unique-local, incl. fd00:ec2::254
        || (s[0] & 0xffc0) == 0xfe80   // link-local
        || (s[0] & 0xffc0) == 0xfec0   // site-local (deprecated)
        || (s[0] & 0xff00) == 0xff00   // multicast
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard-only
}

/// Resolves names with the system resolver and keeps only the addresses that may be
/// reached; a name with none left fails, so the connection can only go to a checked
/// address.
#[derive(Debug, Clone)]
struct CheckingResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for CheckingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(RefusedAddress) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A name resolved only to addresses that may not be reached.
#[derive(Debug, thiserror::Error)]
#[error("the host resolves only to refused (private, loopback, link-local or metadata) addresses")]
pub struct RefusedAddress;

/// The client every delivery goes through.
pub fn client(config: &OutboundConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(config.connect_timeout)
        .timeout(config.timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!(
            "leadledger-subscriptions/",
            env!("CARGO_PKG_VERSION")
        ))
        .dns_resolver(Arc::new(CheckingResolver {
            allow_private: config.allow_private,
        }))
        .build()
        .expect("a client with a rustls backend builds")
}

/// What a receiver answered, or why it did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status: Option<u16>,
    /// Seconds the receiver asked to wait (`Retry-After`, seconds or an HTTP date).
    pub retry_after: Option<u64>,
    pub error: Option<String>,
}

/// At most this much of a response body is read (and then dropped): enough to let the
/// connection be reused, never enough to matter.
const MAX_RESPONSE_READ: usize = 16 * 1024;

/// One POST of `body` to `url` with `headers`.
pub async fn post(
    client: &reqwest::Client,
    config: &OutboundConfig,
    url: &str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
) -> Sent {
    let failed = |error: String| Sent {
        status: None,
        retry_after: None,
        error: Some(error),
    };
    // Checked again at each attempt: the configuration may have changed since.
    let url = match check_target(url, config.allow_private) {
        Ok(url) => url,
        Err(e) => return failed(format!("refused target: {e}")),
    };
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let mut response = match request.body(body).send().await {
        Ok(r) => r,
        Err(e) => return failed(describe(&e)),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let mut read = 0usize;
    let mut error = None;
    while read < MAX_RESPONSE_READ {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) => break,
            Err(e) => {
                // A 2xx whose body broke off was still answered: the status stands.
                error = Some(describe(&e));
                break;
            }
        }
    }
    Sent {
        status: Some(status),
        retry_after,
        error,
    }
}

/// An error in words fit for the delivery log: its kind and causes, never a URL's query.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response broken off"
    } else if e.is_request() {
        "request failed"
    } else {
        "failed"
    };
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let refused = causes.iter().any(|c| c.contains("refused (private"));
    match (refused, causes.last()) {
        (true, _) => format!("refused target: {RefusedAddress}"),
        (false, Some(cause)) => format!("{kind}: {cause}"),
        (false, None) => kind.to_string(),
    }
}

/// `Retry-After` as seconds from now: delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds);
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.timestamp() - chrono::Utc::now().timestamp();
    Some(wait.max(0) as u64)
}

/// Standard Webhooks v1 signatures of `{id}.{timestamp}.{body}`, one `v1,<base64>` entry
/// per key, space-separated.
pub fn sign(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    keys.iter()
        .filter_map(|key| {
            let mac = crate::providers::standard_mac(key, id, &timestamp, body)?;
            Some(format!(
                "v1,{}",
                STANDARD.encode(mac.finalize().into_bytes())
            ))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn targets_need_https_a_host_and_a_public_literal_unless_private_is_allowed() {
        for (url, error) in [
            ("not a url", TargetError::Unparsable),
            ("http://example.com/", TargetError::Scheme),
            ("ftp://example.com/", TargetError::Scheme),
            ("https://user:pw@example.com/", TargetError::Credentials),
            ("https://127.0.0.1/", TargetError::PrivateAddress),
            ("https://2130706433/", TargetError::PrivateAddress),
            ("https://10.0.0.8/", TargetError::PrivateAddress),
            (
                "https://169.254.169.254/latest/",
                TargetError::PrivateAddress,
            ),
            ("https://[::1]:8443/", TargetError::PrivateAddress),
            ("https://[fd00:ec2::254]/", TargetError::PrivateAddress),
            ("https://[::ffff:192.168.0.1]/", TargetError::PrivateAddress),
        ] {
            assert_eq!(check_target(url, false), Err(error), "{url}");
        }
        assert!(check_target("https://example.com/hook?x=1", false).is_ok());
        assert!(check_target("http://127.0.0.1:9/hook", true).is_ok());
        assert_eq!(
            check_target("ftp://127.0.0.1/", true),
            Err(TargetError::Scheme)
        );
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        assert_eq!(parse_retry_after("7"), Some(7));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(0));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
