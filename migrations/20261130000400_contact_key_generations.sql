-- A contact's data key has generations: an erasure destroys the current one, and an
-- email whose erasure was released (its suppression removed) starts a new life of the
-- same stream under a new generation. Events of the erased life stay sealed under the
-- destroyed generation, so they stay unreadable; the new life's events name theirs.
ALTER TABLE contact_keys ADD COLUMN generation integer NOT NULL DEFAULT 0
    CHECK (generation >= 0);
ALTER TABLE contact_keys DROP CONSTRAINT contact_keys_pkey;
ALTER TABLE contact_keys ADD PRIMARY KEY (contact_id, generation);
