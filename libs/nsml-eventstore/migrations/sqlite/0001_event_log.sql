-- The append-only event log, its head, the transactional outbox and consumer checkpoints.

CREATE TABLE events (
    position   INTEGER PRIMARY KEY,
    stream     TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    event_type TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    metadata   TEXT    NOT NULL,
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL,
    UNIQUE (stream, version)
);

-- A single row: the position and hash of the last event. Appends lock it, so positions are assigned in commit order.
CREATE TABLE log_head (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL,
    hash     TEXT    NOT NULL
);

INSERT INTO log_head (id, position, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Events appended but not yet published to the bus.
CREATE TABLE outbox (
    position INTEGER PRIMARY KEY
);

CREATE TABLE consumer_checkpoints (
    consumer TEXT    PRIMARY KEY,
    position INTEGER NOT NULL
);
