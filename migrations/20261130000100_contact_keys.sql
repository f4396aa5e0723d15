-- Personal data at rest (projections/src/pii.rs): one data key per contact, sealed under a
-- key derived from the server's secret key (never stored here). Erasure destroys the key
-- (wrapped_key NULL): every sealed event of the contact becomes unreadable at once.
CREATE TABLE contact_keys (
    contact_id   text        PRIMARY KEY,
    -- 24-byte nonce || XChaCha20-Poly1305 ciphertext of the 32-byte key (aad: contact id).
    wrapped_key  bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz,
    CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL))
);

-- Addresses not to contact: a keyed hash of the normalised email (HMAC-SHA256 under a key
-- derived from the server's secret key), never the address itself.
CREATE TABLE suppressions (
    email_hash  bytea       PRIMARY KEY,
    contact_id  uuid        NOT NULL,
    reason      text        NOT NULL CHECK (reason IN
                    ('manual', 'erased', 'bounced', 'complained', 'unsubscribed',
                     'consent_withdrawn')),
    source      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX suppressions_contact ON suppressions (contact_id);
CREATE INDEX suppressions_created ON suppressions (created_at DESC, email_hash);

-- The export of a person lists their enrollments by `enrollments_view_contact`
-- (20261130000030).
