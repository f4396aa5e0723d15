//! Authentication of a delivery, per source kind: signatures (Standard Webhooks, SendGrid,
//! Mailgun), HTTP Basic (Postmark) and tokens (Instantly, Smartlead, custom).
//!
//! Every comparison with a secret is constant-time (`hmac`'s `verify_slice`, `subtle`);
//! no error carries a secret or what was presented in its place.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{Credentials, Delivery, SourceKind, TOLERANCE_SECS};

/// Why a delivery is refused (401). The text names what was wrong, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the source's credentials are for another kind of source")]
    KindMismatch,
    #[error("the source's stored key is unusable")]
    UnusableKey,
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{0} is not a Unix time")]
    MalformedTimestamp(&'static str),
    #[error("the signed timestamp is more than 5 minutes off")]
    StaleTimestamp,
    #[error("no valid signature")]
    BadSignature,
    #[error("the credentials presented do not match")]
    WrongCredentials,
    #[error("the body is not a JSON object carrying {0}")]
    MalformedBody(&'static str),
}

/// What an authenticated delivery leaves for the caller to check or record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authenticated {
    /// The sender's id for this delivery (`webhook-id`), when it gives one: a repeated
    /// delivery gets the same response again.
    pub delivery_id: Option<String>,
    /// The timestamp the sender signed (Unix seconds), already within the tolerance.
    pub signed_at: Option<i64>,
    /// Mailgun: the token, to be accepted once (recorded under a unique key; a second
    /// delivery with it is a replay and must be refused).
    pub once_token: Option<String>,
}

/// Authenticates `delivery` for a source of `kind` holding `credentials`.
pub fn authenticate(
    kind: SourceKind,
    credentials: &Credentials,
    delivery: &Delivery<'_>,
) -> Result<Authenticated, AuthError> {
    match (kind, credentials) {
        (SourceKind::Standard, Credentials::Standard { key }) => standard(key, delivery),
        (SourceKind::Sendgrid, Credentials::Sendgrid { public_key_der }) => {
            sendgrid(public_key_der, delivery)
        }
        (SourceKind::Mailgun, Credentials::Mailgun { signing_key }) => {
            mailgun(signing_key.as_bytes(), delivery)
        }
        (SourceKind::Postmark, Credentials::Postmark { username, password }) => {
            postmark(username, password, delivery)
        }
        (SourceKind::Instantly, Credentials::Instantly { token })
        | (SourceKind::Custom, Credentials::Custom { token, .. }) => {
            query_or_bearer(token, delivery)
        }
        (SourceKind::Smartlead, Credentials::Smartlead { token }) => smartlead(token, delivery),
        _ => Err(AuthError::KindMismatch),
    }
}

/// Reads a timestamp as Unix seconds and checks it is within the tolerance of `now`.
fn fresh(text: &str, what: &'static str, now: i64) -> Result<i64, AuthError> {
    let ts: i64 = text
        .trim()
        .parse()
        .map_err(|_| AuthError::MalformedTimestamp(what))?;
    // `abs_diff`: a timestamp near `i64::MIN` must not wrap into "close to now".
    if now.abs_diff(ts) > TOLERANCE_SECS {
        return Err(AuthError::StaleTimestamp);
    }
    Ok(ts)
}

/// Equality with a secret in constant time (the length may leak; the content does not).
fn same(presented: &[u8], secret: &[u8]) -> bool {
    bool::from(presented.ct_eq(secret))
}

/// A Standard Webhooks secret (`whsec_<base64>`, the prefix optional as Svix allows) to
/// the HMAC key stored in [`Credentials::Standard`].
pub fn standard_key(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.trim();
    let encoded = encoded.strip_prefix("whsec_").unwrap_or(encoded);
    match STANDARD.decode(encoded) {
        Ok(key) if !key.is_empty() => Ok(key),
        _ => Err("must be whsec_ followed by base64".into()),
    }
}

/// Standard Webhooks v1, also under Svix's header names (Svix, Resend).
fn standard(key: &[u8], d: &Delivery<'_>) -> Result<Authenticated, AuthError> {
    let header = |name: &'static str, svix: &'static str| {
        d.header(name)
            .or_else(|| d.header(svix))
            .ok_or(AuthError::Missing(name))
    };
    let id = header("webhook-id", "svix-id")?;
    let timestamp = header("webhook-timestamp", "svix-timestamp")?;
    let signatures = header("webhook-signature", "svix-signature")?;
    let signed_at = standard_signature(key, id, timestamp, signatures, d.body, d.now)?;
    Ok(Authenticated {
        delivery_id: Some(id.to_string()),
        signed_at: Some(signed_at),
        once_token: None,
    })
}

/// The Standard Webhooks v1 MAC of a message: HMAC-SHA256 under `key` of
/// `{id}.{timestamp}.{body}`. What a sender signs (`app::outbound::sign`) and a receiver
/// checks ([`standard_signature`]). `None`: a key HMAC refuses.
pub fn standard_mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// Standard Webhooks v1 signature check: `timestamp` within the tolerance of `now`, and
/// any `v1,<base64>` entry of `signatures` an HMAC-SHA256 under `key` of
/// `{id}.{timestamp}.{body}`, compared in constant time. Returns the signed time.
pub fn standard_signature(
    key: &[u8],
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
) -> Result<i64, AuthError> {
    let signed_at = fresh(timestamp, "webhook-timestamp", now)?;
    let mac = standard_mac(key, id, timestamp, body).ok_or(AuthError::UnusableKey)?;
    // Several entries during a key rotation; any `v1,` one that matches will do.
    let valid = signatures
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|signature| mac.clone().verify_slice(&signature).is_ok());
    if valid {
        Ok(signed_at)
    } else {
        Err(AuthError::BadSignature)
    }
}

/// SendGrid's verification key as SendGrid shows it — base64 of the DER
/// SubjectPublicKeyInfo — or as PEM, to the DER bytes stored; `Err` if it is not a P-256
/// public key (for the source-creation route's 422).
pub fn sendgrid_public_key_der(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    let key = if text.starts_with("-----BEGIN") {
        VerifyingKey::from_public_key_pem(text).map_err(|_| "not a PEM P-256 public key")?
    } else {
        let der = STANDARD
            .decode(text)
            .map_err(|_| "not base64 (nor PEM)".to_string())?;
        VerifyingKey::from_public_key_der(&der).map_err(|_| "not a DER P-256 public key")?
    };
    key.to_public_key_der()
        .map(|der| der.as_bytes().to_vec())
        .map_err(|_| "not a P-256 public key".to_string())
}

/// SendGrid's Signed Event Webhook: ECDSA P-256/SHA-256 over the timestamp header's
/// value followed by the raw body.
fn sendgrid(public_key_der: &[u8], d: &Delivery<'_>) -> Result<Authenticated, AuthError> {
    const SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
    const TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";
    let key =
        VerifyingKey::from_public_key_der(public_key_der).map_err(|_| AuthError::UnusableKey)?;
    let signature = d.header(SIGNATURE).ok_or(AuthError::Missing(SIGNATURE))?;
    let timestamp = d.header(TIMESTAMP).ok_or(AuthError::Missing(TIMESTAMP))?;
    let signed_at = fresh(timestamp, TIMESTAMP, d.now)?;
    let signature = STANDARD
        .decode(signature.trim())
        .ok()
        .and_then(|der| Signature::from_der(&der).ok())
        .ok_or(AuthError::BadSignature)?;
    let mut message = Vec::with_capacity(timestamp.len() + d.body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.extend_from_slice(d.body);
    key.verify(&message, &signature)
        .map_err(|_| AuthError::BadSignature)?;
    Ok(Authenticated {
        delivery_id: None,
        signed_at: Some(signed_at),
        once_token: None,
    })
}

/// Mailgun: `signature: {timestamp, token, signature}` in the body; the signature is the
/// hex HMAC-SHA256 of `timestamp` followed by `token`, keyed by the signing key.
fn mailgun(signing_key: &[u8], d: &Delivery<'_>) -> Result<Authenticated, AuthError> {
    let body: Value =
        serde_json::from_slice(d.body).map_err(|_| AuthError::MalformedBody("signature"))?;
    let signed = body
        .get("signature")
        .ok_or(AuthError::Missing("signature"))?;
    let field = |name: &'static str| -> Result<String, AuthError> {
        match signed.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            // Mailgun sends the timestamp as a string; a number is taken in its JSON text.
            Some(Value::Number(n)) if name == "timestamp" => Ok(n.to_string()),
            Some(_) => Err(AuthError::MalformedBody("signature")),
            None => Err(AuthError::Missing(name)),
        }
    };
    let timestamp = field("timestamp")?;
    let token = field("token")?;
    let signature = field("signature")?;
    let signed_at = fresh(&timestamp, "signature.timestamp", d.now)?;
    let signature = hex::decode(signature.trim()).map_err(|_| AuthError::BadSignature)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(signing_key).map_err(|_| AuthError::UnusableKey)?;
    mac.update(timestamp.as_bytes());
    mac.update(token.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    Ok(Authenticated {
        delivery_id: None,
        signed_at: Some(signed_at),
        once_token: Some(token),
    })
}

/// Postmark: HTTP Basic credentials equal to the stored ones.
fn postmark(username: &str, password: &str, d: &Delivery<'_>) -> Result<Authenticated, AuthError> {
    let header = d
        .header("authorization")
        .ok_or(AuthError::Missing("authorization"))?;
    let (scheme, encoded) = header
        .trim()
        .split_once(' ')
        .ok_or(AuthError::WrongCredentials)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::WrongCredentials);
    }
    let presented = STANDARD
        .decode(encoded.trim())
        .map_err(|_| AuthError::WrongCredentials)?;
    // A user-id holds no `:` (RFC 7617), so comparing `user:password` whole is exact.
    let expected = format!("{username}:{password}");
    if same(&presented, expected.as_bytes()) {
        Ok(Authenticated::default())
    } else {
        Err(AuthError::WrongCredentials)
    }
}

/// The bearer token of an `Authorization` header (scheme in any case).
fn bearer<'a>(d: &'a Delivery<'_>) -> Option<&'a str> {
    let (scheme, token) = d.header("authorization")?.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Any of the presented tokens equal to the stored one; each compared in full.
fn token_check(token: &str, presented: &[&str]) -> Result<Authenticated, AuthError> {
    if presented.is_empty() {
        return Err(AuthError::Missing("token"));
    }
    let matched = presented
        .iter()
        .fold(false, |ok, p| ok | same(p.as_bytes(), token.as_bytes()));
    if matched {
        Ok(Authenticated::default())
    } else {
        Err(AuthError::WrongCredentials)
    }
}

/// Instantly and custom sources: `?token=` or `Authorization: Bearer`.
fn query_or_bearer(token: &str, d: &Delivery<'_>) -> Result<Authenticated, AuthError> {
    let query = d.query_param("token");
    let presented: Vec<&str> = query.as_deref().into_iter().chain(bearer(d)).collect();
    token_check(token, &presented)
}

/// Smartlead: the body's `secret_key`, or `?token=`.
fn smartlead(token: &str, d: &Delivery<'_>) -> Result<Authenticated, AuthError> {
    let query = d.query_param("token");
    // Smartlead sends one JSON object per delivery; a body that is not one simply
    // presents no `secret_key`.
    let body: Option<Value> = serde_json::from_slice(d.body).ok();
    let secret_key = body
        .as_ref()
        .and_then(|b| b.get("secret_key"))
        .and_then(Value::as_str);
    let presented: Vec<&str> = query.as_deref().into_iter().chain(secret_key).collect();
    token_check(token, &presented)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;

    const NOW: i64 = 1_764_450_000;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn delivery<'a>(
        headers: &'a [(String, String)],
        query: &'a str,
        body: &'a [u8],
        now: i64,
    ) -> Delivery<'a> {
        Delivery {
            headers,
            query,
            body,
            now,
        }
    }

    // --- Standard Webhooks --------------------------------------------------------

    fn standard_signature(key: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn a_standard_delivery_signed_with_the_key_is_accepted_under_either_header_name() {
        let key = b"0123456789abcdef0123456789abcdef";
        let creds = Credentials::Standard { key: key.to_vec() };
        let body = br#"{"id":"e1"}"#;
        let ts = NOW.to_string();
        let sig = standard_signature(key, "msg_1", &ts, body);
        for prefix in ["webhook", "svix"] {
            let h = headers(&[
                (&format!("{prefix}-id"), "msg_1"),
                (&format!("{prefix}-timestamp"), &ts),
                (
                    &format!("{prefix}-signature"),
                    &format!("v1,bm90IGl0 {sig}"),
                ),
            ]);
            let ok = authenticate(
                SourceKind::Standard,
                &creds,
                &delivery(&h, "", body, NOW + 299),
            )
            .unwrap();
            assert_eq!(ok.delivery_id.as_deref(), Some("msg_1"));
            assert_eq!(ok.signed_at, Some(NOW));
        }
    }

    #[test]
    fn a_standard_delivery_with_a_bad_signature_a_stale_time_or_a_missing_header_is_refused() {
        let key = b"0123456789abcdef0123456789abcdef";
        let creds = Credentials::Standard { key: key.to_vec() };
        let body = br#"{"id":"e1"}"#;
        let ts = NOW.to_string();
        let sig = standard_signature(key, "msg_1", &ts, body);
        let h = headers(&[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
        ]);
        let check = |h: &[(String, String)], body: &[u8], now: i64| {
            authenticate(SourceKind::Standard, &creds, &delivery(h, "", body, now))
        };
        assert_eq!(
            check(&h, br#"{"id":"e2"}"#, NOW),
            Err(AuthError::BadSignature)
        );
        assert_eq!(check(&h, body, NOW + 301), Err(AuthError::StaleTimestamp));
        assert_eq!(check(&h, body, NOW - 301), Err(AuthError::StaleTimestamp));
        assert_eq!(
            check(&h[..2], body, NOW),
            Err(AuthError::Missing("webhook-signature"))
        );
        let other = Credentials::Standard {
            key: b"another key entirely".to_vec(),
        };
        assert_eq!(
            authenticate(SourceKind::Standard, &other, &delivery(&h, "", body, NOW)),
            Err(AuthError::BadSignature)
        );
        // A timestamp at the far end of i64 must not wrap into "close to now".
        let far = headers(&[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", &i64::MIN.to_string()),
            ("webhook-signature", &sig),
        ]);
        assert_eq!(check(&far, body, NOW), Err(AuthError::StaleTimestamp));
        assert_eq!(check(&far, body, i64::MAX), Err(AuthError::StaleTimestamp));
    }

    #[test]
    fn a_standard_secret_reads_with_or_without_its_prefix() {
        let key = standard_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(key.len(), 24);
        assert_eq!(
            standard_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
            key
        );
        assert!(standard_key("whsec_").is_err());
        assert!(standard_key("whsec_!!").is_err());
    }

    #[test]
    fn credentials_of_another_kind_are_refused() {
        let creds = Credentials::Instantly { token: "t".into() };
        let h = headers(&[("authorization", "Bearer t")]);
        assert_eq!(
            authenticate(SourceKind::Custom, &creds, &delivery(&h, "", b"", NOW)),
            Err(AuthError::KindMismatch)
        );
    }

    // --- SendGrid -----------------------------------------------------------------

    /// The published vector of SendGrid's SDKs (sendgrid-python
    /// `test/unit/test_eventwebhook.py`, also in sendgrid-nodejs
    /// `packages/eventwebhook`): the payload is the compact, key-sorted JSON followed by
    /// CRLF, as SendGrid sent it.
    const SG_PUBLIC_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==";
    const SG_SIGNATURE: &str = "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM=";
    const SG_TIMESTAMP: &str = "1600112502";
    const SG_PAYLOAD: &str = "[{\"email\":\"hello@world.com\",\"event\":\"dropped\",\"reason\":\"Bounced Address\",\"sg_event_id\":\"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA\",\"sg_message_id\":\"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0\",\"smtp-id\":\"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>\",\"timestamp\":1600112492}]\r\n";
    /// The SDKs' "bad key" and "bad signature" values for the same payload.
    const SG_OTHER_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqTxd43gyp8IOEto2LdIfjRQrIbsd4SXZkLW6jDutdhXSJCWHw8REntlo7aNDthvj+y7GjUuFDb/R1NGe1OPzpA==";
    const SG_OTHER_SIGNATURE: &str = "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH3j/0=";

    fn sendgrid_creds(text: &str) -> Credentials {
        Credentials::Sendgrid {
            public_key_der: sendgrid_public_key_der(text).unwrap(),
        }
    }

    fn sendgrid_headers(signature: &str, timestamp: &str) -> Vec<(String, String)> {
        headers(&[
            ("x-twilio-email-event-webhook-signature", signature),
            ("x-twilio-email-event-webhook-timestamp", timestamp),
        ])
    }

    #[test]
    fn sendgrids_published_test_vector_verifies() {
        let h = sendgrid_headers(SG_SIGNATURE, SG_TIMESTAMP);
        let now = SG_TIMESTAMP.parse().unwrap();
        let ok = authenticate(
            SourceKind::Sendgrid,
            &sendgrid_creds(SG_PUBLIC_KEY),
            &delivery(&h, "", SG_PAYLOAD.as_bytes(), now),
        )
        .unwrap();
        assert_eq!(ok.signed_at, Some(now));
    }

    #[test]
    fn sendgrids_published_vector_fails_with_their_bad_key_bad_payload_bad_signature_and_bad_timestamp()
     {
        let now: i64 = SG_TIMESTAMP.parse().unwrap();
        let check = |key: &str, sig: &str, ts: &str, body: &str| {
            let h = sendgrid_headers(sig, ts);
            authenticate(
                SourceKind::Sendgrid,
                &sendgrid_creds(key),
                &delivery(&h, "", body.as_bytes(), now),
            )
        };
        let bad = Err(AuthError::BadSignature);
        assert_eq!(
            check(SG_OTHER_KEY, SG_SIGNATURE, SG_TIMESTAMP, SG_PAYLOAD),
            bad
        );
        assert_eq!(
            check(SG_PUBLIC_KEY, SG_SIGNATURE, SG_TIMESTAMP, "payload"),
            bad
        );
        assert_eq!(
            check(SG_PUBLIC_KEY, SG_OTHER_SIGNATURE, SG_TIMESTAMP, SG_PAYLOAD),
            bad
        );
        // The payload without its trailing CRLF is another message.
        assert_eq!(
            check(
                SG_PUBLIC_KEY,
                SG_SIGNATURE,
                SG_TIMESTAMP,
                SG_PAYLOAD.trim_end()
            ),
            bad
        );
        assert_eq!(
            check(SG_PUBLIC_KEY, SG_SIGNATURE, "timestamp", SG_PAYLOAD),
            Err(AuthError::MalformedTimestamp(
                "x-twilio-email-event-webhook-timestamp"
            ))
        );
        // The vector's own time, five minutes and a second later: stale.
        let h = sendgrid_headers(SG_SIGNATURE, SG_TIMESTAMP);
        assert_eq!(
            authenticate(
                SourceKind::Sendgrid,
                &sendgrid_creds(SG_PUBLIC_KEY),
                &delivery(&h, "", SG_PAYLOAD.as_bytes(), now + 301),
            ),
            Err(AuthError::StaleTimestamp)
        );
    }

    #[test]
    fn a_key_pair_made_here_signs_as_sendgrid_does_and_pem_keys_are_read() {
        use p256::pkcs8::LineEnding;
        let signing = SigningKey::random(&mut rand_core::OsRng);
        let public = signing.verifying_key();
        let der_b64 = STANDARD.encode(public.to_public_key_der().unwrap().as_bytes());
        let pem = public.to_public_key_pem(LineEnding::LF).unwrap();
        assert_eq!(
            sendgrid_public_key_der(&der_b64).unwrap(),
            sendgrid_public_key_der(&pem).unwrap()
        );
        let body = br#"[{"email":"a@example.com","event":"delivered"}]"#;
        let ts = NOW.to_string();
        let mut message = ts.as_bytes().to_vec();
        message.extend_from_slice(body);
        let signature: Signature = signing.sign(&message);
        let sig_b64 = STANDARD.encode(signature.to_der().as_bytes());
        let creds = sendgrid_creds(&pem);
        let h = sendgrid_headers(&sig_b64, &ts);
        assert!(authenticate(SourceKind::Sendgrid, &creds, &delivery(&h, "", body, NOW)).is_ok());
        // One byte of the body changed.
        let mut tampered = body.to_vec();
        tampered[3] ^= 1;
        assert_eq!(
            authenticate(
                SourceKind::Sendgrid,
                &creds,
                &delivery(&h, "", &tampered, NOW)
            ),
            Err(AuthError::BadSignature)
        );
        // Another timestamp, signature unchanged (also within the window).
        let h2 = sendgrid_headers(&sig_b64, &(NOW + 1).to_string());
        assert_eq!(
            authenticate(SourceKind::Sendgrid, &creds, &delivery(&h2, "", body, NOW)),
            Err(AuthError::BadSignature)
        );
        // Missing headers; a signature that is not base64 DER.
        assert_eq!(
            authenticate(
                SourceKind::Sendgrid,
                &creds,
                &delivery(&h[1..], "", body, NOW)
            ),
            Err(AuthError::Missing("x-twilio-email-event-webhook-signature"))
        );
        assert_eq!(
            authenticate(
                SourceKind::Sendgrid,
                &creds,
                &delivery(&h[..1], "", body, NOW)
            ),
            Err(AuthError::Missing("x-twilio-email-event-webhook-timestamp"))
        );
        let junk = sendgrid_headers("!!not base64", &ts);
        assert_eq!(
            authenticate(
                SourceKind::Sendgrid,
                &creds,
                &delivery(&junk, "", body, NOW)
            ),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn a_sendgrid_key_that_is_not_a_p256_public_key_is_refused_when_given() {
        assert!(sendgrid_public_key_der("not a key").is_err());
        assert!(sendgrid_public_key_der(&STANDARD.encode(b"0123456789")).is_err());
        assert!(
            sendgrid_public_key_der("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
                .is_err()
        );
        let stored = Credentials::Sendgrid {
            public_key_der: b"garbage".to_vec(),
        };
        let h = sendgrid_headers(SG_SIGNATURE, SG_TIMESTAMP);
        assert_eq!(
            authenticate(
                SourceKind::Sendgrid,
                &stored,
                &delivery(&h, "", SG_PAYLOAD.as_bytes(), 1600112502)
            ),
            Err(AuthError::UnusableKey)
        );
    }

    // --- Mailgun ------------------------------------------------------------------

    const MG_KEY: &str = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0";

    fn mailgun_body(key: &str, timestamp: &str, token: &str) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(timestamp.as_bytes());
        mac.update(token.as_bytes());
        let signature = hex::encode(mac.finalize().into_bytes());
        serde_json::to_vec(&serde_json::json!({
            "signature": {"timestamp": timestamp, "token": token, "signature": signature},
            "event-data": {"event": "delivered", "id": "CPgfbmQMTCKtHW6uIWtuVe", "timestamp": 1521472262.908181}
        }))
        .unwrap()
    }

    #[test]
    fn a_mailgun_delivery_signed_with_the_key_is_accepted_and_its_token_returned() {
        let creds = Credentials::Mailgun {
            signing_key: MG_KEY.into(),
        };
        let token = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0";
        let body = mailgun_body(MG_KEY, &NOW.to_string(), token);
        let ok = authenticate(SourceKind::Mailgun, &creds, &delivery(&[], "", &body, NOW)).unwrap();
        assert_eq!(ok.once_token.as_deref(), Some(token));
        assert_eq!(ok.signed_at, Some(NOW));
    }

    #[test]
    fn a_mailgun_signature_computed_elsewhere_verifies() {
        // Mailgun's documented sample signature block, re-signed with a known key by an
        // independent HMAC implementation (Python's hmac), so that this code and its
        // tests cannot share one mistake.
        let creds = Credentials::Mailgun {
            signing_key: MG_KEY.into(),
        };
        let body = br#"{"signature": {"timestamp": "1529006854",
            "token": "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0",
            "signature": "b63c0701c4f4b614f272106a1b367c5c3369bcdca664ae73ebd52787e45eef07"},
            "event-data": {"event": "opened", "timestamp": 1529006854.329574, "id": "DACSsAdVSeGpLid7TN03WA"}}"#;
        let ok = authenticate(
            SourceKind::Mailgun,
            &creds,
            &delivery(&[], "", body, 1_529_006_854),
        )
        .unwrap();
        assert_eq!(
            ok.once_token.as_deref(),
            Some("a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0")
        );
    }

    #[test]
    fn a_mailgun_delivery_with_a_bad_signature_a_stale_time_or_no_signature_is_refused() {
        let creds = Credentials::Mailgun {
            signing_key: MG_KEY.into(),
        };
        let check = |body: &[u8], now: i64| {
            authenticate(SourceKind::Mailgun, &creds, &delivery(&[], "", body, now))
        };
        let good = mailgun_body(MG_KEY, &NOW.to_string(), "tok");
        assert_eq!(
            check(&mailgun_body("another-key", &NOW.to_string(), "tok"), NOW),
            Err(AuthError::BadSignature)
        );
        assert_eq!(check(&good, NOW + 301), Err(AuthError::StaleTimestamp));
        // The signature moved to another token.
        let text = String::from_utf8(good.clone()).unwrap();
        assert_eq!(
            check(text.replace("\"tok\"", "\"tol\"").as_bytes(), NOW),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check(br#"{"event-data": {}}"#, NOW),
            Err(AuthError::Missing("signature"))
        );
        assert_eq!(
            check(br#"{"signature": {"timestamp": "1", "token": "t"}}"#, NOW),
            Err(AuthError::Missing("signature"))
        );
        assert_eq!(
            check(b"not json", NOW),
            Err(AuthError::MalformedBody("signature"))
        );
        assert_eq!(
            check(
                format!(
                    r#"{{"signature": {{"timestamp": "{NOW}", "token": "t", "signature": "zz"}}}}"#
                )
                .as_bytes(),
                NOW
            ),
            Err(AuthError::BadSignature)
        );
    }

    // --- Postmark -----------------------------------------------------------------

    fn basic(user: &str, password: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
    }

    #[test]
    fn postmark_deliveries_need_the_stored_basic_credentials() {
        let creds = Credentials::Postmark {
            username: "postmark".into(),
            password: "s3cret:with colon".into(),
        };
        let check = |auth: Option<&str>| {
            let h = auth
                .map(|a| headers(&[("authorization", a)]))
                .unwrap_or_default();
            authenticate(SourceKind::Postmark, &creds, &delivery(&h, "", b"{}", NOW))
        };
        assert!(check(Some(&basic("postmark", "s3cret:with colon"))).is_ok());
        assert!(
            check(Some(
                &basic("postmark", "s3cret:with colon").replace("Basic", "basic")
            ))
            .is_ok()
        );
        let wrong = Err(AuthError::WrongCredentials);
        assert_eq!(check(Some(&basic("postmark", "s3cret"))), wrong);
        assert_eq!(check(Some(&basic("other", "s3cret:with colon"))), wrong);
        assert_eq!(check(Some("Bearer s3cret")), wrong);
        assert_eq!(check(Some("Basic !!!")), wrong);
        assert_eq!(check(None), Err(AuthError::Missing("authorization")));
    }

    // --- Tokens -------------------------------------------------------------------

    #[test]
    fn instantly_and_custom_deliveries_need_the_token_in_the_query_or_as_a_bearer() {
        let mapping = crate::providers::CustomMapping::parse(&serde_json::json!({
            "id": "/id", "type": "/type", "email": "/email",
            "occurred_at": "/at", "campaign": "/campaign",
            "types": {"sent": "sent"}
        }))
        .unwrap();
        for creds in [
            Credentials::Instantly {
                token: "tok_123".into(),
            },
            Credentials::Custom {
                token: "tok_123".into(),
                mapping,
            },
        ] {
            let kind = creds.kind();
            let check = |query: &str, auth: Option<&str>| {
                let h = auth
                    .map(|a| headers(&[("authorization", a)]))
                    .unwrap_or_default();
                authenticate(kind, &creds, &delivery(&h, query, b"{}", NOW))
            };
            assert!(check("token=tok_123", None).is_ok());
            assert!(check("", Some("Bearer tok_123")).is_ok());
            assert!(check("", Some("bEaReR tok_123")).is_ok());
            // A wrong query token with a right bearer: the bearer authenticates.
            assert!(check("token=nope", Some("Bearer tok_123")).is_ok());
            let wrong = Err(AuthError::WrongCredentials);
            assert_eq!(check("token=tok_124", None), wrong);
            assert_eq!(check("token=tok_12", None), wrong);
            assert_eq!(check("", Some("Bearer tok_1234")), wrong);
            assert_eq!(
                check("", Some("Basic tok_123")),
                Err(AuthError::Missing("token"))
            );
            assert_eq!(
                check("other=tok_123", None),
                Err(AuthError::Missing("token"))
            );
        }
    }

    #[test]
    fn smartlead_deliveries_need_the_token_as_secret_key_or_in_the_query() {
        let creds = Credentials::Smartlead {
            token: "sl_secret".into(),
        };
        let check = |query: &str, body: &[u8]| {
            authenticate(
                SourceKind::Smartlead,
                &creds,
                &delivery(&[], query, body, NOW),
            )
        };
        assert!(
            check(
                "",
                br#"{"event_type":"EMAIL_SENT","secret_key":"sl_secret"}"#
            )
            .is_ok()
        );
        assert!(check("token=sl_secret", br#"{"event_type":"EMAIL_SENT"}"#).is_ok());
        assert!(check("token=sl_secret", b"not json").is_ok());
        assert_eq!(
            check("", br#"{"secret_key":"sl_secreT"}"#),
            Err(AuthError::WrongCredentials)
        );
        assert_eq!(
            check("", br#"{"secret_key":5}"#),
            Err(AuthError::Missing("token"))
        );
        assert_eq!(check("", b"[]"), Err(AuthError::Missing("token")));
    }

    proptest::proptest! {
        #[test]
        fn hostile_headers_queries_and_bodies_never_panic_authentication(
            names in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("webhook-id".to_string()),
                    proptest::strategy::Just("webhook-timestamp".to_string()),
                    proptest::strategy::Just("webhook-signature".to_string()),
                    proptest::strategy::Just("x-twilio-email-event-webhook-signature".to_string()),
                    proptest::strategy::Just("x-twilio-email-event-webhook-timestamp".to_string()),
                    proptest::strategy::Just("authorization".to_string()),
                    "[a-z-]{1,12}",
                ],
                0..6,
            ),
            values in proptest::collection::vec(".{0,40}", 6),
            query in ".{0,40}",
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
            now in proptest::prelude::any::<i64>(),
        ) {
            let h: Vec<(String, String)> = names.into_iter().zip(values).collect();
            let all = [
                Credentials::Standard { key: b"k".to_vec() },
                Credentials::Sendgrid { public_key_der: sendgrid_public_key_der(SG_PUBLIC_KEY).unwrap() },
                Credentials::Mailgun { signing_key: MG_KEY.into() },
                Credentials::Postmark { username: "u".into(), password: "p".into() },
                Credentials::Instantly { token: "t".into() },
                Credentials::Smartlead { token: "t".into() },
            ];
            for creds in &all {
                let _ = authenticate(creds.kind(), creds, &delivery(&h, &query, &body, now));
            }
        }
    }
}
