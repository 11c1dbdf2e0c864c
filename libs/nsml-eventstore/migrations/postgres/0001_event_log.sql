-- The append-only event log, its head, the transactional outbox and consumer checkpoints.

CREATE TABLE events (
    position   BIGINT PRIMARY KEY,
    stream     TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    event_type TEXT   NOT NULL,
    payload    BYTEA  NOT NULL,
    metadata   TEXT   NOT NULL,
    prev_hash  TEXT   NOT NULL,
    hash       TEXT   NOT NULL,
    UNIQUE (stream, version)
);

-- A single row: the position and hash of the last event. Appends lock it (SELECT ... FOR UPDATE), so appends
-- from every process are serialized and positions become visible in order, without gaps.
CREATE TABLE log_head (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    position BIGINT   NOT NULL,
    hash     TEXT     NOT NULL
);

INSERT INTO log_head (id, position, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Events appended but not yet published to the bus.
CREATE TABLE outbox (
    position BIGINT PRIMARY KEY
);

CREATE TABLE consumer_checkpoints (
    consumer TEXT   PRIMARY KEY,
    position BIGINT NOT NULL
);
