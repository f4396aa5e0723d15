-- The index of whom each stored reply names takes its entries into a pending list again.
-- Every record is inserted by the write statement of a command batch, the one statement
-- at a time that paces the commands: going into the index at once cost it about 12 µs a
-- record (about 15% of the statement at 32 clients). Appending to the pending list costs
-- next to nothing; the list is merged into the index by a worker of every server process,
-- once a second (`app::privacy::merge_reply_names`), beside the commands rather than
-- inside one. The limit bounds what a write merges itself if no worker ran for a while:
-- 1 MB, some thousands of records, a few milliseconds. An erasure searches the pending
-- list as well as the index.
ALTER INDEX idempotency_records_subjects SET (fastupdate = on, gin_pending_list_limit = 1024);
