-- Provider sources: a source's kind says how its deliveries are authenticated and read.
-- Every credential stays sealed under the server's secret key (src/secrets.rs): for
-- `standard` the sealed text is the `whsec_` secret, for the other kinds a JSON document
-- of that kind's credentials. A rotation keeps the credential it replaces, still
-- accepted until `previous_expires_at`.
ALTER TABLE webhook_sources
    ADD COLUMN kind text NOT NULL DEFAULT 'standard'
        CHECK (kind IN ('standard', 'sendgrid', 'mailgun', 'postmark', 'instantly',
                        'smartlead', 'custom')),
    ADD COLUMN previous_nonce      bytea,
    ADD COLUMN previous_ciphertext bytea,
    ADD COLUMN previous_expires_at timestamptz,
    ADD COLUMN rotated_at          timestamptz,
    ADD CONSTRAINT webhook_sources_previous_whole CHECK (
        (previous_nonce IS NULL) = (previous_ciphertext IS NULL)
        AND (previous_nonce IS NULL) = (previous_expires_at IS NULL));

-- Mailgun signs a random token with each delivery; a token is accepted once. Written in
-- the delivery's transaction, so a delivery that fails leaves its token unspent. Tokens
-- older than the signature tolerance can no longer be replayed (their signed timestamp
-- is refused), so they are deleted after it.
CREATE TABLE webhook_once_tokens (
    source  text        NOT NULL,
    token   text        NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, token)
);
CREATE INDEX webhook_once_tokens_age ON webhook_once_tokens (seen_at);

-- An engagement tool's campaign id names at most one of our campaigns per source. Written
-- in the transaction that appends the campaign's `CampaignExternalIdsChanged`, so the
-- guard and the campaign's stream agree; deliveries find their campaign here.
CREATE TABLE campaign_external_ids (
    source      text NOT NULL,
    external_id text NOT NULL,
    campaign_id uuid NOT NULL,
    PRIMARY KEY (source, external_id)
);
CREATE INDEX campaign_external_ids_campaign ON campaign_external_ids (campaign_id);
