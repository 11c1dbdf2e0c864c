-- A batch of appends in one statement: `nsml_append` locks the head, checks each append's stream version in
-- turn, writes its events chained by hash and moves the head, all inside the statement's own transaction. The
-- appender then pays one round trip (and one commit) per batch instead of six or more, which the head lock,
-- held across every round trip, made the ceiling of appends per second for every process sharing the log.
--
-- Append i takes `counts[i]` consecutive entries of the flattened event arrays. `expected_kinds`: 0 any version,
-- 1 no stream, 2 exactly `expected_versions[i]`. Appends sharing a nonzero `chains` number are one writer's
-- chain: once one of them is refused, the later ones are refused too, as is an append with `broken` set (its
-- chain failed before the batch). A refused append writes nothing and its row says so, with the stream's
-- version; the others still commit. The hash is the one `event_hash` (src/hash.rs) computes: SHA-256 over the
-- domain tag and each field as an 8-byte big-endian length and its bytes.

CREATE FUNCTION nsml_append(
    streams           TEXT[],
    expected_kinds    SMALLINT[],
    expected_versions BIGINT[],
    chains            INT[],
    broken            BOOLEAN[],
    counts            INT[],
    event_types       TEXT[],
    payloads          BYTEA[],
    metadatas         TEXT[]
) RETURNS TABLE (appended BOOLEAN, stream_version BIGINT, first_at BIGINT, last_at BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    head_at    BIGINT;
    head_hash  TEXT;
    started_at BIGINT;
    cur_version BIGINT;
    failed     INT[] := '{}';
    n          INT := 0;
    pos        BIGINT;
    ver        BIGINT;
    hashed     TEXT;
    s          BYTEA;
    t          BYTEA;
    m          BYTEA;
    p          BYTEA;
    prev       BYTEA;
BEGIN
    SELECT h.position, h.hash INTO head_at, head_hash FROM log_head h WHERE h.id = 1 FOR UPDATE;
    started_at := head_at;
    FOR i IN 1 .. COALESCE(array_length(streams, 1), 0) LOOP
        SELECT COALESCE(MAX(e.version), 0) INTO cur_version FROM events e WHERE e.stream = streams[i];
        IF broken[i]
           OR (chains[i] <> 0 AND chains[i] = ANY (failed))
           OR (expected_kinds[i] = 1 AND cur_version <> 0)
           OR (expected_kinds[i] = 2 AND cur_version <> expected_versions[i]) THEN
            IF chains[i] <> 0 THEN
                failed := failed || chains[i];
            END IF;
            n := n + counts[i];
            appended := FALSE;
            stream_version := cur_version;
            first_at := 0;
            last_at := 0;
            RETURN NEXT;
            CONTINUE;
        END IF;
        first_at := head_at + 1;
        s := convert_to(streams[i], 'UTF8');
        FOR j IN 1 .. counts[i] LOOP
            n := n + 1;
            pos := head_at + 1;
            ver := cur_version + j;
            t := convert_to(event_types[n], 'UTF8');
            m := convert_to(metadatas[n], 'UTF8');
            p := payloads[n];
            prev := convert_to(head_hash, 'UTF8');
            hashed := encode(sha256(
                'nsml.event.v1'::BYTEA
                || int8send(octet_length(prev)::BIGINT) || prev
                || int8send(8::BIGINT) || int8send(pos)
                || int8send(octet_length(s)::BIGINT) || s
                || int8send(8::BIGINT) || int8send(ver)
                || int8send(octet_length(t)::BIGINT) || t
                || int8send(octet_length(p)::BIGINT) || p
                || int8send(octet_length(m)::BIGINT) || m
            ), 'hex');
            INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash)
            VALUES (pos, streams[i], ver, event_types[n], p, metadatas[n], head_hash, hashed);
            head_at := pos;
            head_hash := hashed;
        END LOOP;
        appended := TRUE;
        stream_version := cur_version + counts[i];
        last_at := head_at;
        RETURN NEXT;
    END LOOP;
    IF head_at > started_at THEN
        UPDATE log_head SET position = head_at, hash = head_hash WHERE id = 1;
    END IF;
END
$$;

-- The relay's acknowledgement in one statement, for the same reason: `nsml_outbox_ack` moves the watermark as
-- `advance_watermark` (src/row.rs) does. Its commit is not waited for on disk: an acknowledgement lost in a
-- crash only has its events published again, which consumers drop as duplicates, where waiting for the flush
-- made every relay round pay a second one after the append's.
CREATE FUNCTION nsml_outbox_ack(positions BIGINT[]) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    relayed_to BIGINT;
    beyond     BIGINT[];
    head_at    BIGINT;
    acked      BIGINT[];
    moved      BIGINT;
    p          BIGINT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT w.relayed, w.relayed_beyond INTO relayed_to, beyond FROM outbox_watermark w WHERE w.id = 1 FOR UPDATE;
    SELECT h.position INTO head_at FROM log_head h WHERE h.id = 1;
    acked := ARRAY(
        SELECT DISTINCT a FROM unnest(beyond || positions) AS a WHERE a > relayed_to AND a <= head_at ORDER BY a
    );
    moved := relayed_to;
    FOREACH p IN ARRAY acked LOOP
        EXIT WHEN p <> moved + 1;
        moved := p;
    END LOOP;
    acked := ARRAY(SELECT a FROM unnest(acked) AS a WHERE a > moved ORDER BY a);
    IF moved <> relayed_to OR cardinality(acked) <> cardinality(beyond) THEN
        UPDATE outbox_watermark SET relayed = moved, relayed_beyond = acked WHERE id = 1;
    END IF;
END
$$;
