-- A command's load for several streams at once: each stream's snapshot and the events
-- after it, its data keys and the answer recorded for its command's idempotency key, in
-- one statement. The commands of one aggregate type that arrive while another's load is
-- under way are loaded together by the next (one statement and one round trip for all
-- of them); a command alone is loaded by it with one stream.
--
-- It replaces `leadledger_load_answering` of one stream, whose statement it runs for each
-- stream in turn: that statement keeps one generic plan per connection (planning it for
-- each execution's values took longer than running it), and every branch of it looks its
-- rows up by key, so that plan is right whatever the values. One statement joining the
-- array of streams to the tables instead would be planned once for the tables as they
-- were then: made while they were small, its generic plan scans them whole, and goes on
-- doing so once they are not. The function is `STABLE`, so every stream is read in the
-- snapshot of the statement that calls it.
DROP FUNCTION leadledger_load_answering(text, text, boolean, boolean, text, uuid);

-- `answer_keys` and `answer_owners` go with `stream_ids`, one each (NULL: no key). A
-- record's row (kind 3) names its stream in `aggregate_id`.
CREATE FUNCTION leadledger_load_answering(
    stream_type text, stream_ids text[], with_snapshot boolean, personal boolean,
    answer_keys text[], answer_owners uuid[])
RETURNS TABLE (kind integer, aggregate_id text, sequence bigint, event_type text,
               event_version text, payload jsonb, metadata jsonb, "position" bigint,
               transaction_id text, bytes bigint, wrapped_key bytea, request_hash bytea)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    stream_id text;
    answer_key text;
    answer_owner uuid;
BEGIN
    FOR i IN 1 .. coalesce(array_length(stream_ids, 1), 0) LOOP
        stream_id := stream_ids[i];
        answer_key := answer_keys[i];
        answer_owner := answer_owners[i];
        RETURN QUERY
        WITH s AS (
            SELECT sn.aggregate_id, sn.last_sequence, sn.last_position,
                   sn.last_transaction_id, sn.payload
            FROM snapshots sn
            WHERE with_snapshot AND sn.aggregate_type = stream_type
              AND sn.aggregate_id = stream_id
        )
        SELECT 0, s.aggregate_id, s.last_sequence, NULL::text, NULL::text, s.payload,
               NULL::jsonb, s.last_position, s.last_transaction_id::text, 0::bigint,
               NULL::bytea, NULL::bytea
        FROM s
        UNION ALL
        -- The key's record: its status (-1: a claim without an answer), headers,
        -- position, sealed body and request hash.
        SELECT 3, stream_id, coalesce(r.response_status, -1)::bigint, NULL, NULL,
               r.response_headers, NULL, r.response_position,
               r.response_transaction_id::text, 0, r.response_body, r.request_hash
        FROM idempotency_records r
        WHERE r.api_key_id = answer_owner AND r.idempotency_key = answer_key
        UNION ALL
        SELECT 1, e.aggregate_id, e.sequence, e.event_type, e.event_version,
               e.payload, e.metadata, e.position, e.transaction_id::text,
               octet_length(e.payload::text)::bigint, NULL, NULL
        FROM events e
        WHERE e.aggregate_type = stream_type AND e.aggregate_id = stream_id
          AND e.sequence > coalesce((SELECT last_sequence FROM s), 0)
        UNION ALL
        SELECT 2, k.contact_id, k.generation::bigint, NULL, NULL, NULL, NULL, NULL, NULL,
               0, k.wrapped_key, NULL
        FROM contact_keys k
        WHERE personal AND k.contact_id = stream_id;
    END LOOP;
END
$$;
