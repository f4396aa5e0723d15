//! Personal data at rest: each contact's personal fields are sealed under that contact's
//! own data key, and each data key under a key derived from the server's secret key. The
//! one way to read a stored payload of a personal aggregate is [`open_event`] /
//! [`open_state`]: the event store's loads, its snapshots and the feed of the projections
//! all go through them, so an event reads the same everywhere. The feed opens an event's
//! text in place with [`open_event_text`], which shares the decryption and gives the same
//! JSON value (a test holds the two to it).
//!
//! Sealed form: the personal members of an event (inside its variant object) or of a
//! snapshot are taken out and replaced by one member, `"pii"`, the base64 of a 24-byte
//! nonce and the XChaCha20-Poly1305 ciphertext of those members as a JSON object, with
//! `"<aggregate type>:<id>"` as associated data (a sealed value moved to another stream
//! does not open). Members that are not personal (times, quality score, consent status)
//! stay in the clear, so they remain queryable.
//!
//! Erasure destroys the data key (`contact_keys.wrapped_key` becomes NULL). From then on
//! every event of the stream reads as `{"ContactRedacted": {}}` — never an error that would
//! stop a projection — and a snapshot is unreadable (so the stream is replayed).
//!
//! Keys have generations. A stream's events are sealed under its current generation; when
//! an erased contact's email is released and created again, the new life's first event
//! makes the next generation ([`keys_for_writing`] with `renew`). A sealed member of
//! generation 0 is plain base64; of a later one, `"<generation>:<base64>"`. So the erased
//! life's events keep naming their destroyed generation and stay unreadable, while the
//! new life's open.

use std::collections::HashMap;
use std::sync::RwLock;

use aggregates::ContactEmail;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sqlx::PgConnection;

/// The aggregate types whose events carry personal data.
pub const PERSONAL_TYPES: &[&str] = &["contact"];

/// Members that stay in the clear in a sealed payload: none of them says who a person is.
const CLEAR_MEMBERS: &[&str] = &[
    "created",
    "created_at",
    "updated_at",
    "enriched_at",
    "erased_at",
    "released_at",
    "quality_score",
    "recorded_at",
    "status",
    "basis",
];

/// The member that holds the sealed personal members.
pub const SEALED_MEMBER: &str = "pii";

/// The members an event's variant object may have without holding personal data in the
/// clear: the clear ones and the sealed one. A member of any other name is personal data
/// in the clear (what [`event_needs_key`] finds), for queries that look for it.
pub fn clear_or_sealed_members() -> Vec<&'static str> {
    CLEAR_MEMBERS
        .iter()
        .copied()
        .chain([SEALED_MEMBER])
        .collect()
}

/// Events that start a life of a personal stream: written to a stream whose key was
/// destroyed (an erased contact created again), they make the key's next generation.
pub const NEW_LIFE_EVENTS: &[&str] = &["ContactCreated"];

/// What an event of an erased contact reads as.
pub const REDACTED_VARIANT: &str = "ContactRedacted";

#[derive(Debug, thiserror::Error)]
pub enum PiiError {
    #[error(
        "personal data is encrypted but no secret key was installed in this process (a defect)"
    )]
    NoKeyring,
    /// The configured secret key is not the one the data keys were sealed under.
    #[error(
        "the data key of a contact cannot be opened with the configured secret key \
         (LEADLEDGER_SECRET_KEY or <data dir>/secret.key is not the key this database was \
         written with; restore that key from its backup)"
    )]
    WrongSecretKey,
    #[error("a sealed payload cannot be opened: {0}")]
    Corrupt(&'static str),
    /// A write of personal data to a contact whose key was destroyed (an erased contact).
    #[error("the contact's data key was destroyed (the contact is erased)")]
    Destroyed,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The key that seals data keys, derived from the server's secret key.
#[derive(Clone)]
pub struct Keyring {
    cipher: XChaCha20Poly1305,
    /// The key of the names of emails in stored replies ([`reply_names`]), derived from
    /// the same key.
    names: [u8; 32],
}

static KEYRING: RwLock<Option<Keyring>> = RwLock::new(None);

/// Installs the process's key that seals data keys. A process serves with one secret key;
/// the last one installed is used.
pub fn install(key: [u8; 32]) {
    let keyring = Keyring {
        cipher: XChaCha20Poly1305::new(Key::from_slice(&key)),
        names: keyed(&key, b"reply-names"),
    };
    *KEYRING.write().unwrap_or_else(|e| e.into_inner()) = Some(keyring);
}

fn keyring() -> Result<Keyring, PiiError> {
    KEYRING
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or(PiiError::NoKeyring)
}

/// Whether writes seal personal data: always, but in a build with the `unsealed` feature,
/// which exists only to measure what sealing costs (the same code writing contact data in
/// the clear, as before encryption) and must never serve real data.
pub const SEALING: bool = !cfg!(feature = "unsealed");

pub fn is_personal(aggregate_type: &str) -> bool {
    PERSONAL_TYPES.contains(&aggregate_type)
}

/// A contact's data key as read: usable, or destroyed by an erasure.
#[derive(Clone)]
pub enum DataKey {
    Open(XChaCha20Poly1305),
    Destroyed,
}

/// The generations of one stream's data key, oldest first (the last is current).
#[derive(Clone, Default)]
pub struct Generations(Vec<(i32, DataKey)>);

impl std::fmt::Debug for Generations {
    /// The generations and whether each is destroyed; never a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.0
                    .iter()
                    .map(|(g, k)| (g, matches!(k, DataKey::Destroyed))),
            )
            .finish()
    }
}

impl Generations {
    fn current(&self) -> Option<(i32, &DataKey)> {
        self.0.last().map(|(g, k)| (*g, k))
    }

    fn of(&self, generation: i32) -> Option<&DataKey> {
        self.0
            .iter()
            .find(|(g, _)| *g == generation)
            .map(|(_, k)| k)
    }

    /// The key new data is sealed with: the current generation. `None`: the stream has no
    /// key yet; [`PiiError::Destroyed`]: its last life was erased.
    pub fn write_key(&self) -> Result<Option<WriteKey>, PiiError> {
        match self.current() {
            Some((generation, DataKey::Open(cipher))) => Ok(Some(WriteKey {
                generation,
                cipher: cipher.clone(),
            })),
            Some((_, DataKey::Destroyed)) => Err(PiiError::Destroyed),
            None => Ok(None),
        }
    }

    /// These generations with `key` as the newest (a key this writer just made).
    pub fn with_written(&self, key: &WriteKey) -> Self {
        let mut next = self.clone();
        if next.current().map(|(g, _)| g) != Some(key.generation) {
            next.0
                .push((key.generation, DataKey::Open(key.cipher.clone())));
        }
        next
    }
}

/// Data keys of a set of streams; a stream without a row has never held sealed data.
#[derive(Clone, Default)]
pub struct Keys(HashMap<String, Generations>);

impl Keys {
    /// The current generation of stream `id`'s key: destroyed when the stream's last life
    /// was erased.
    pub fn get(&self, id: &str) -> Option<&DataKey> {
        self.0.get(id).and_then(|g| g.current()).map(|(_, k)| k)
    }

    fn of(&self, id: &str, generation: i32) -> Option<&DataKey> {
        self.0.get(id).and_then(|g| g.of(generation))
    }

    /// The keys of `contact_keys` rows (stream, generation, wrapped key or NULL when
    /// destroyed), in generation order per stream, opened with the server's key.
    pub fn from_rows(rows: Vec<(String, i32, Option<Vec<u8>>)>) -> Result<Self, PiiError> {
        let mut keys: HashMap<String, Generations> = HashMap::with_capacity(rows.len());
        if rows.is_empty() {
            return Ok(Self(keys));
        }
        let keyring = keyring()?;
        for (id, generation, wrapped) in rows {
            let key = match wrapped {
                Some(wrapped) => unwrap_key(&keyring, &id, generation, &wrapped)?,
                None => DataKey::Destroyed,
            };
            keys.entry(id).or_default().0.push((generation, key));
        }
        Ok(Self(keys))
    }

    /// The generations of stream `id` as read (none: it never held sealed data).
    pub fn generations(&self, id: &str) -> Generations {
        self.0.get(id).cloned().unwrap_or_default()
    }

    /// The keys of one stream (for measurements and tests of sealing on its own).
    pub fn with(id: &str, key: XChaCha20Poly1305) -> Self {
        Self(HashMap::from([(
            id.to_string(),
            Generations(vec![(0, DataKey::Open(key))]),
        )]))
    }
}

/// The key new data of a stream is sealed with: its current generation.
#[derive(Clone)]
pub struct WriteKey {
    generation: i32,
    cipher: XChaCha20Poly1305,
}

impl WriteKey {
    /// A first-generation key (for measurements and tests of sealing on its own).
    pub fn first(cipher: XChaCha20Poly1305) -> Self {
        Self {
            generation: 0,
            cipher,
        }
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

fn seal_bytes(cipher: &XChaCha20Poly1305, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce: [u8; 24] = random();
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("encryption of a buffer in memory cannot fail"),
    );
    out
}

fn open_bytes(cipher: &XChaCha20Poly1305, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 24 {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(24);
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .ok()
}

/// What a wrapped data key is bound to: its stream, and its generation after the first.
fn key_aad(id: &str, generation: i32) -> Vec<u8> {
    if generation == 0 {
        id.as_bytes().to_vec()
    } else {
        format!("{id}#{generation}").into_bytes()
    }
}

fn unwrap_key(
    keyring: &Keyring,
    id: &str,
    generation: i32,
    wrapped: &[u8],
) -> Result<DataKey, PiiError> {
    let raw = open_bytes(&keyring.cipher, wrapped, &key_aad(id, generation))
        .ok_or(PiiError::WrongSecretKey)?;
    if raw.len() != 32 {
        return Err(PiiError::Corrupt("a data key is not 32 bytes"));
    }
    Ok(DataKey::Open(XChaCha20Poly1305::new(Key::from_slice(&raw))))
}

/// The data keys of `ids` (streams of `aggregate_type`); empty for a type without
/// personal data.
pub async fn keys(
    conn: &mut PgConnection,
    aggregate_type: &str,
    ids: &[String],
) -> Result<Keys, PiiError> {
    if !is_personal(aggregate_type) || ids.is_empty() {
        return Ok(Keys::default());
    }
    let rows = sqlx::query!(
        "SELECT contact_id, generation, wrapped_key FROM contact_keys
         WHERE contact_id = ANY($1) ORDER BY contact_id, generation",
        ids
    )
    .fetch_all(&mut *conn)
    .await?;
    Keys::from_rows(
        rows.into_iter()
            .map(|r| (r.contact_id, r.generation, r.wrapped_key))
            .collect(),
    )
}

/// The data keys to seal new events of `ids` with, made for the streams that have none
/// yet (in the caller's transaction, so a rolled-back write leaves no key behind).
/// A stream whose current key was destroyed (an erased contact) gets its next generation
/// if it is in `renew` (its write starts a new life), and [`PiiError::Destroyed`] if not.
pub async fn keys_for_writing(
    conn: &mut PgConnection,
    ids: &[String],
    renew: &[String],
) -> Result<HashMap<String, WriteKey>, PiiError> {
    let mut ids: Vec<String> = ids.to_vec();
    ids.sort();
    ids.dedup();
    let found = keys(conn, PERSONAL_TYPES[0], &ids).await?;
    let known: Vec<(String, Generations)> = ids
        .iter()
        .map(|id| (id.clone(), found.generations(id)))
        .collect();
    let (mut chosen, made) = plan_write_keys(&known, renew)?;
    if made.is_empty() {
        return Ok(chosen);
    }
    // In id order, so two writers making keys for overlapping sets cannot deadlock.
    let inserted = sqlx::query!(
        "INSERT INTO contact_keys (contact_id, generation, wrapped_key)
         SELECT * FROM UNNEST($1::text[], $2::int4[], $3::bytea[])
         ON CONFLICT (contact_id, generation) DO NOTHING
         RETURNING contact_id, generation",
        &made.ids,
        &made.generations,
        &made.wrapped
    )
    .fetch_all(&mut *conn)
    .await?;
    // Another writer made some of them first (and committed): use theirs.
    let stored: std::collections::HashSet<&str> =
        inserted.iter().map(|r| r.contact_id.as_str()).collect();
    let raced: Vec<String> = made
        .ids
        .iter()
        .filter(|id| !stored.contains(id.as_str()))
        .cloned()
        .collect();
    if !raced.is_empty() {
        let theirs = keys(conn, PERSONAL_TYPES[0], &raced).await?;
        for id in raced {
            let key = theirs
                .generations(&id)
                .write_key()?
                .ok_or(PiiError::Corrupt("a data key was neither found nor made"))?;
            chosen.insert(id, key);
        }
    }
    Ok(chosen)
}

/// Keys made for writing, to be stored (in id order) in the writer's transaction:
/// `contact_keys` rows as arrays, for one `UNNEST`.
#[derive(Default)]
pub struct NewKeys {
    pub ids: Vec<String>,
    pub generations: Vec<i32>,
    pub wrapped: Vec<Vec<u8>>,
}

impl NewKeys {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The keys to seal new events of the streams in `known` with (each given with its key's
/// generations as read), and the keys to make for the streams that have none: a stream
/// whose current key was destroyed gets its next generation if it is in `renew` (its write
/// starts a new life), and [`PiiError::Destroyed`] if not. No database work: the caller
/// stores the [`NewKeys`] with its write, where a writer that made the same key first
/// shows as a conflict on `contact_keys`.
pub fn plan_write_keys(
    known: &[(String, Generations)],
    renew: &[String],
) -> Result<(HashMap<String, WriteKey>, NewKeys), PiiError> {
    let mut chosen: HashMap<String, WriteKey> = HashMap::with_capacity(known.len());
    let mut made = NewKeys::default();
    // Read once, when the first key is to be made (a write that makes none needs none).
    let mut sealing: Option<Keyring> = None;
    for (id, generations) in known {
        let generation = match generations.write_key() {
            Ok(Some(key)) => {
                chosen.insert(id.clone(), key);
                continue;
            }
            Ok(None) => 0,
            Err(PiiError::Destroyed) if renew.contains(id) => {
                generations.current().map_or(0, |(g, _)| g + 1)
            }
            Err(e) => return Err(e),
        };
        let keyring = match &mut sealing {
            Some(keyring) => keyring,
            None => sealing.insert(keyring()?),
        };
        let raw: [u8; 32] = random();
        made.ids.push(id.clone());
        made.generations.push(generation);
        made.wrapped
            .push(seal_bytes(&keyring.cipher, &raw, &key_aad(id, generation)));
        chosen.insert(
            id.clone(),
            WriteKey {
                generation,
                cipher: XChaCha20Poly1305::new(Key::from_slice(&raw)),
            },
        );
    }
    Ok((chosen, made))
}

fn aad(aggregate_type: &str, id: &str) -> Vec<u8> {
    format!("{aggregate_type}:{id}").into_bytes()
}

/// Whether `object` holds personal members (ones [`seal_object`] would take out).
fn has_personal(object: &Map<String, Value>) -> bool {
    object
        .keys()
        .any(|k| k != SEALED_MEMBER && !CLEAR_MEMBERS.contains(&k.as_str()))
}

/// The object an event payload's members live in: the one member of its variant object
/// (`{"ContactCreated": {...}}`).
fn variant_object(payload: &mut Value) -> Option<(&String, &mut Map<String, Value>)> {
    let outer = payload.as_object_mut()?;
    if outer.len() != 1 {
        return None;
    }
    let (name, inner) = outer.iter_mut().next()?;
    Some((name, inner.as_object_mut()?))
}

/// Whether an event payload of `aggregate_type` needs a data key to be written.
pub fn event_needs_key(aggregate_type: &str, payload: &Value) -> bool {
    if !is_personal(aggregate_type) {
        return false;
    }
    // The one member of the variant object, read in place (as `variant_object` finds it).
    payload
        .as_object()
        .filter(|outer| outer.len() == 1)
        .and_then(|outer| outer.values().next())
        .and_then(Value::as_object)
        .is_some_and(has_personal)
}

fn seal_object(key: &WriteKey, aggregate_type: &str, id: &str, object: &mut Map<String, Value>) {
    if !has_personal(object) {
        return;
    }
    let personal: Map<String, Value> = object
        .iter()
        .filter(|(k, _)| !CLEAR_MEMBERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    object.retain(|k, _| CLEAR_MEMBERS.contains(&k.as_str()));
    let plaintext = serde_json::to_vec(&personal).expect("a JSON object serializes");
    let sealed = STANDARD.encode(seal_bytes(
        &key.cipher,
        &plaintext,
        &aad(aggregate_type, id),
    ));
    let text = if key.generation == 0 {
        sealed
    } else {
        format!("{}:{sealed}", key.generation)
    };
    object.insert(SEALED_MEMBER.into(), Value::String(text));
}

/// Seals the personal members of an event payload in place.
pub fn seal_event(key: &WriteKey, aggregate_type: &str, id: &str, payload: &mut Value) {
    if let Some((_, object)) = variant_object(payload) {
        seal_object(key, aggregate_type, id, object);
    }
}

/// Seals the personal members of a snapshot's state in place.
pub fn seal_state(key: &WriteKey, aggregate_type: &str, id: &str, state: &mut Value) {
    if let Some(object) = state.as_object_mut() {
        seal_object(key, aggregate_type, id, object);
    }
}

enum Opened {
    Clear,
    Redacted,
}

fn open_object(
    keys: &Keys,
    aggregate_type: &str,
    id: &str,
    object: &mut Map<String, Value>,
) -> Result<Opened, PiiError> {
    let Some(sealed) = object.remove(SEALED_MEMBER) else {
        // Clear text: written before encryption (so in the first generation), or nothing
        // personal in it.
        let destroyed = matches!(keys.of(id, 0), Some(DataKey::Destroyed));
        return Ok(if destroyed && has_personal(object) {
            Opened::Redacted
        } else {
            Opened::Clear
        });
    };
    let text = sealed
        .as_str()
        .ok_or(PiiError::Corrupt("the sealed member is not a string"))?;
    let Some(plaintext) = unseal(keys, aggregate_type, id, text)? else {
        return Ok(Opened::Redacted);
    };
    let personal: Map<String, Value> = serde_json::from_slice(&plaintext)
        .map_err(|_| PiiError::Corrupt("sealed data is not a JSON object"))?;
    object.extend(personal);
    Ok(Opened::Clear)
}

/// The plaintext of a sealed member's text, `None` when it is redacted: emptied, or its
/// key's generation destroyed.
fn unseal(
    keys: &Keys,
    aggregate_type: &str,
    id: &str,
    text: &str,
) -> Result<Option<Vec<u8>>, PiiError> {
    if text.is_empty() {
        return Ok(None);
    }
    let (generation, text) = match text.split_once(':') {
        Some((generation, rest)) => (
            generation
                .parse::<i32>()
                .map_err(|_| PiiError::Corrupt("the sealed member's generation is not a number"))?,
            rest,
        ),
        None => (0, text),
    };
    let cipher = match keys.of(id, generation) {
        Some(DataKey::Open(cipher)) => cipher,
        Some(DataKey::Destroyed) => return Ok(None),
        None => {
            return Err(PiiError::Corrupt(
                "sealed data of a stream without that data key",
            ));
        }
    };
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| PiiError::Corrupt("the sealed member is not base64"))?;
    open_bytes(cipher, &bytes, &aad(aggregate_type, id))
        .map(Some)
        .ok_or(PiiError::Corrupt(
            "sealed data does not open with its stream's key",
        ))
}

/// The members of a JSON object as written, borrowed from its text (a key with escapes
/// is unescaped into its own string). A member written twice keeps its last value, as in
/// a [`Map`].
type RawMembers<'a> = std::collections::BTreeMap<std::borrow::Cow<'a, str>, &'a RawValue>;

/// [`open_event`] on an event payload's text, giving text: the personal members are
/// opened into the variant object beside its clear members, without building the JSON
/// tree (which costs more than the decryption). The result reads as the same JSON value
/// as [`open_event`]'s. `None` when the payload does not have the sealed form this reads
/// (no sealed member, not an object of one variant object): [`open_event`] decides those.
pub fn open_event_text(
    keys: &Keys,
    aggregate_type: &str,
    id: &str,
    payload: &str,
) -> Result<Option<String>, PiiError> {
    if !is_personal(aggregate_type) {
        return Ok(None);
    }
    let Ok(outer) = serde_json::from_str::<RawMembers<'_>>(payload) else {
        return Ok(None);
    };
    let mut variants = outer.iter();
    let (Some((variant, inner)), None) = (variants.next(), variants.next()) else {
        return Ok(None);
    };
    let Ok(object) = serde_json::from_str::<RawMembers<'_>>(inner.get()) else {
        return Ok(None);
    };
    let Some(Ok(sealed)) = object
        .get(SEALED_MEMBER)
        .map(|raw| serde_json::from_str::<std::borrow::Cow<'_, str>>(raw.get()))
    else {
        return Ok(None);
    };
    let Some(plaintext) = unseal(keys, aggregate_type, id, &sealed)? else {
        return Ok(Some(redacted_event().to_string()));
    };
    let personal: RawMembers<'_> = serde_json::from_slice(&plaintext)
        .map_err(|_| PiiError::Corrupt("sealed data is not a JSON object"))?;
    let mut text = Vec::with_capacity(payload.len() + plaintext.len());
    text.push(b'{');
    write_key(&mut text, variant);
    text.extend_from_slice(b":{");
    let clear = object
        .iter()
        .filter(|(k, _)| *k != SEALED_MEMBER && !personal.contains_key(*k));
    for (i, (k, v)) in clear.chain(personal.iter()).enumerate() {
        if i > 0 {
            text.push(b',');
        }
        write_key(&mut text, k);
        text.push(b':');
        text.extend_from_slice(v.get().as_bytes());
    }
    text.extend_from_slice(b"}}");
    // Keys written by serde_json and values copied from valid text: valid UTF-8.
    String::from_utf8(text)
        .map(Some)
        .map_err(|_| PiiError::Corrupt("sealed data is not UTF-8"))
}

fn write_key(text: &mut Vec<u8>, key: &str) {
    serde_json::to_writer(text, key).expect("a string serializes");
}

/// What an event of an erased contact reads as, in both of [`open_event`]'s forms.
fn redacted_event() -> Value {
    serde_json::json!({ REDACTED_VARIANT: {} })
}

/// An event payload of stream `id` as the aggregate reads it: its personal members opened,
/// or `{"ContactRedacted": {}}` when its key was destroyed. Payloads of aggregates
/// without personal data come back as they are.
pub fn open_event(
    keys: &Keys,
    aggregate_type: &str,
    id: &str,
    mut payload: Value,
) -> Result<Value, PiiError> {
    if !is_personal(aggregate_type) {
        return Ok(payload);
    }
    let Some((_, object)) = variant_object(&mut payload) else {
        return Ok(payload);
    };
    match open_object(keys, aggregate_type, id, object)? {
        Opened::Clear => Ok(payload),
        Opened::Redacted => Ok(redacted_event()),
    }
}

/// A snapshot's state as the aggregate reads it; `None` when it cannot be read (its key
/// destroyed): the caller replays the stream instead.
pub fn open_state(
    keys: &Keys,
    aggregate_type: &str,
    id: &str,
    mut state: Value,
) -> Result<Option<Value>, PiiError> {
    if !is_personal(aggregate_type) {
        return Ok(Some(state));
    }
    let Some(object) = state.as_object_mut() else {
        return Ok(Some(state));
    };
    match open_object(keys, aggregate_type, id, object)? {
        Opened::Clear => Ok(Some(state)),
        Opened::Redacted => Ok(None),
    }
}

/// An event payload with its personal members dropped (and marked as redacted): what
/// an erasure leaves of an event stored in the clear.
pub fn redact_event(payload: &mut Value) {
    if let Some((_, object)) = variant_object(payload)
        && has_personal(object)
    {
        object.retain(|k, _| CLEAR_MEMBERS.contains(&k.as_str()));
        object.insert(SEALED_MEMBER.into(), Value::String(String::new()));
    }
}

/// Whether an event payload still holds personal members in the clear.
pub fn is_clear_personal(aggregate_type: &str, payload: &Value) -> bool {
    event_needs_key(aggregate_type, payload)
}

/// Opens three data keys of the database (not destroyed, the first by contact id), to
/// check that the configured secret key is the one they were sealed with. `Ok(false)`
/// when there is none. In the primary key's order, so that the check reads a few rows of
/// its index at every start, however many contacts there are.
pub async fn check_secret_key(conn: &mut PgConnection) -> Result<bool, PiiError> {
    let rows = sqlx::query!(
        "SELECT contact_id, generation, wrapped_key AS \"wrapped_key!\" FROM contact_keys
         WHERE wrapped_key IS NOT NULL ORDER BY contact_id, generation LIMIT 3"
    )
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(false);
    }
    let keyring = keyring()?;
    for row in rows {
        unwrap_key(&keyring, &row.contact_id, row.generation, &row.wrapped_key)?;
    }
    Ok(true)
}

/// HMAC-SHA256 of `data` under `key`.
fn keyed(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The name an email goes by among a stored reply's [`reply_names`]: its keyed hash (the
/// database alone cannot tell whose it is), as a UUID. `None` without an installed key.
pub fn email_name(email: &ContactEmail) -> Option<uuid::Uuid> {
    let keyring = keyring().ok()?;
    Some(name_of(&keyring.names, email.as_str()))
}

fn name_of(key: &[u8; 32], normalised: &str) -> uuid::Uuid {
    let hash = keyed(key, normalised.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    uuid::Uuid::from_bytes(bytes)
}

/// Whom a reply (its JSON text, before sealing) names, so that an erasure finds the
/// replies naming a person through an index instead of opening every stored reply: each
/// UUID in its text (a contact's id is not personal), and the [`email_name`] of each
/// address in it, normalised as a contact's email is. Sorted, without repeats.
pub fn reply_names(reply: &[u8]) -> Vec<uuid::Uuid> {
    names_in(keyring().ok().map(|k| k.names), reply)
}

fn names_in(key: Option<[u8; 32]>, reply: &[u8]) -> Vec<uuid::Uuid> {
    let mut names = Vec::new();
    let mut i = 0;
    while i < reply.len() {
        // A UUID in its hyphenated form, as serde writes one (the only form of 36 bytes).
        if let Some(Ok(id)) = reply.get(i..i + 36).map(uuid::Uuid::try_parse_ascii) {
            names.push(id);
            i += 36;
            continue;
        }
        i += 1;
    }
    if let Some(key) = key {
        // An address: the run of address characters either side of each `@`.
        let local =
            |b: u8| b.is_ascii_alphanumeric() || b >= 0x80 || b"!#$%&'*+-/=?^_`{|}~.".contains(&b);
        let domain = |b: u8| b.is_ascii_alphanumeric() || b >= 0x80 || b == b'.' || b == b'-';
        for at in reply
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'@')
            .map(|(i, _)| i)
        {
            let start = reply[..at]
                .iter()
                .rposition(|&b| !local(b))
                .map_or(0, |p| p + 1);
            let end = reply[at + 1..]
                .iter()
                .position(|&b| !domain(b))
                .map_or(reply.len(), |p| at + 1 + p);
            let Ok(text) = std::str::from_utf8(&reply[start..end]) else {
                continue;
            };
            let text = text.trim_end_matches(['.', '-']);
            if text.is_ascii() {
                // As `ContactEmail::parse` spells an address of ASCII letters: lower-cased.
                names.push(name_of(&key, &text.to_ascii_lowercase()));
            } else if let Ok(email) = ContactEmail::parse(text) {
                names.push(name_of(&key, email.as_str()));
            }
        }
    }
    names.sort_unstable();
    names.dedup();
    names
}

/// What starts a sealed stored reply (an idempotency record's body); a body without it
/// was stored in the clear by an earlier release.
pub const SEALED_RECORD: &[u8] = b"LLS1";

/// Seals a stored reply (bytes) under the server's key, bound to `aad` (its record's
/// key): replies can name a person, and the database alone must not show them. Without
/// an installed key (a tool that never reads contacts) the reply is kept as it is.
pub fn seal_record(aad: &[u8], body: &[u8]) -> Vec<u8> {
    match keyring() {
        Ok(keyring) => {
            let mut out = SEALED_RECORD.to_vec();
            out.extend(seal_bytes(&keyring.cipher, body, aad));
            out
        }
        Err(_) => body.to_vec(),
    }
}

/// A stored reply as sealed by [`seal_record`] (or stored in the clear), opened.
pub fn open_record(aad: &[u8], stored: &[u8]) -> Result<Vec<u8>, PiiError> {
    let Some(sealed) = stored.strip_prefix(SEALED_RECORD) else {
        return Ok(stored.to_vec());
    };
    let keyring = keyring()?;
    open_bytes(&keyring.cipher, sealed, aad).ok_or(PiiError::WrongSecretKey)
}

/// Whether a stored reply is sealed.
pub fn is_sealed_record(stored: &[u8]) -> bool {
    stored.starts_with(SEALED_RECORD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cipher() -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&random::<32>()))
    }

    fn keys_of(id: &str, generations: Vec<(i32, DataKey)>) -> Keys {
        Keys(HashMap::from([(id.to_string(), Generations(generations))]))
    }

    #[test]
    fn a_reply_is_named_by_its_uuids_and_the_keyed_names_of_its_emails_as_normalised() {
        let key = random::<32>();
        let id = uuid::Uuid::new_v4();
        let reply = json!({
            "id": id,
            "errors": [{"row": 3, "message": "row 3 (Ann.Lee+News@Example.ORG.) was refused"}],
            "also": "zoë@exämple.org",
            "none": "not@an address, @, a@",
        })
        .to_string();
        let names = names_in(Some(key), reply.as_bytes());
        let named = |email: &str| names.contains(&name_of(&key, email));
        assert!(names.contains(&id), "{names:?}");
        assert!(named("ann.lee+news@example.org"), "{names:?}");
        let unicode = ContactEmail::parse("zoë@exämple.org").unwrap();
        assert!(named(unicode.as_str()), "{names:?}");
        assert!(!named("someone@example.org"));
        // Without a key, the UUIDs alone.
        assert_eq!(names_in(None, reply.as_bytes()), vec![id]);
        // The same reply, the same names, sorted and without repeats.
        assert_eq!(names, names_in(Some(key), reply.as_bytes()));
        assert!(names.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_sealed_event_hides_personal_members_and_opens_to_the_same_payload() {
        let key = WriteKey::first(cipher());
        let original = json!({"ContactCreated": {
            "email": "ada@example.com", "fields": {"first_name": "Ada-Marie"},
            "created_at": "2026-01-01T00:00:00Z"}});
        let mut sealed = original.clone();
        seal_event(&key, "contact", "c1", &mut sealed);
        let text = sealed.to_string();
        // Both hold a character base64 never writes, so no sealed text can hold them by
        // chance ("Ada" alone turned up in one in a few thousand ciphertexts).
        assert!(
            !text.contains("ada@example.com") && !text.contains("Ada-Marie"),
            "{text}"
        );
        assert!(text.contains("created_at"));
        let keys = keys_of("c1", vec![(0, DataKey::Open(key.cipher.clone()))]);
        assert_eq!(
            open_event(&keys, "contact", "c1", sealed.clone()).unwrap(),
            original
        );
        // Bound to its stream: moved to another one, it does not open.
        let moved = keys_of("c2", vec![(0, keys.get("c1").unwrap().clone())]);
        assert!(open_event(&moved, "contact", "c2", sealed.clone()).is_err());
        let destroyed = keys_of("c1", vec![(0, DataKey::Destroyed)]);
        assert_eq!(
            open_event(&destroyed, "contact", "c1", sealed).unwrap(),
            json!({"ContactRedacted": {}})
        );
    }

    #[test]
    fn an_event_opens_from_its_text_to_the_same_value_as_from_its_tree() {
        let key = WriteKey::first(cipher());
        let later = WriteKey {
            generation: 2,
            cipher: cipher(),
        };
        let keys = keys_of(
            "c1",
            vec![
                (0, DataKey::Open(key.cipher.clone())),
                (2, DataKey::Open(later.cipher.clone())),
            ],
        );
        let original = json!({"ContactUpdated": {
            "email": "ada@example.com", "fields": {"first_name": "Ada \"A\" é"},
            "updated_at": "2026-01-01T00:00:00Z", "quality_score": 0.5}});
        for key in [&key, &later] {
            let mut sealed = original.clone();
            seal_event(key, "contact", "c1", &mut sealed);
            // A clear member that the sealed members also name (they win in both forms), and
            // one whose name needs escaping.
            let inner = sealed["ContactUpdated"].as_object_mut().unwrap();
            inner.insert("email".into(), json!("stale@example.com"));
            inner.insert("status\"x".into(), json!([1, {"a": null}]));
            let mut expected = original.clone();
            expected["ContactUpdated"]["status\"x"] = json!([1, {"a": null}]);
            // As PostgreSQL prints jsonb (spaces), and compact.
            for stored in [
                serde_json::to_string_pretty(&sealed).unwrap(),
                sealed.to_string(),
            ] {
                let text = open_event_text(&keys, "contact", "c1", &stored)
                    .unwrap()
                    .expect("the sealed form reads as text");
                assert_eq!(text.matches("\"email\"").count(), 1, "{text}");
                let from_text: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(from_text, expected);
                assert_eq!(
                    open_event(&keys, "contact", "c1", sealed.clone()).unwrap(),
                    expected
                );
            }
        }

        let mut sealed = original.clone();
        seal_event(&key, "contact", "c1", &mut sealed);
        let stored = sealed.to_string();
        let destroyed = keys_of("c1", vec![(0, DataKey::Destroyed)]);
        assert_eq!(
            open_event_text(&destroyed, "contact", "c1", &stored)
                .unwrap()
                .unwrap(),
            r#"{"ContactRedacted":{}}"#
        );
        let moved = keys_of("c2", vec![(0, keys.get("c1").unwrap().clone())]);
        assert!(open_event_text(&moved, "contact", "c2", &stored).is_err());
        // Forms this does not read are left to the tree.
        for other in [
            original.to_string(),
            r#"{"A": {"pii": 1}}"#.to_string(),
            r#"{"A": {}, "B": {}}"#.to_string(),
            r#"{"A": []}"#.to_string(),
        ] {
            assert_eq!(
                open_event_text(&keys, "contact", "c1", &other).unwrap(),
                None
            );
        }
        assert_eq!(
            open_event_text(&keys, "budget", "c1", &stored).unwrap(),
            None
        );
    }

    #[test]
    fn events_without_personal_members_stay_as_they_are() {
        let key = WriteKey::first(cipher());
        let erased = json!({"ContactErased": {"erased_at": "2026-01-01T00:00:00Z"}});
        let mut same = erased.clone();
        seal_event(&key, "contact", "c1", &mut same);
        assert_eq!(same, erased);
        assert!(!event_needs_key("contact", &erased));
        assert!(!event_needs_key(
            "campaign",
            &json!({"CampaignCreated": {"name": "x"}})
        ));
    }

    #[test]
    fn a_new_life_opens_under_its_own_generation_while_the_erased_life_stays_redacted() {
        let (old, new) = (cipher(), cipher());
        let payload = |email: &str| {
            json!({"ContactCreated": {"email": email, "fields": {},
                "created_at": "2026-01-01T00:00:00Z"}})
        };
        let mut first = payload("ada@example.com");
        seal_event(&WriteKey::first(old), "contact", "c1", &mut first);
        let mut second = payload("ada@example.com");
        let renewed = WriteKey {
            generation: 1,
            cipher: new.clone(),
        };
        seal_event(&renewed, "contact", "c1", &mut second);
        let sealed = second["ContactCreated"]["pii"].as_str().unwrap();
        assert!(sealed.starts_with("1:"), "{sealed}");
        let keys = keys_of(
            "c1",
            vec![(0, DataKey::Destroyed), (1, DataKey::Open(new.clone()))],
        );
        assert!(matches!(keys.get("c1"), Some(DataKey::Open(_))));
        assert_eq!(
            open_event(&keys, "contact", "c1", first).unwrap(),
            json!({"ContactRedacted": {}})
        );
        assert_eq!(
            open_event(&keys, "contact", "c1", second.clone()).unwrap(),
            payload("ada@example.com")
        );
        // A generation the stream does not have is an error, never a silent redaction.
        let without = keys_of("c1", vec![(0, DataKey::Open(new))]);
        assert!(open_event(&without, "contact", "c1", second).is_err());
    }
}
