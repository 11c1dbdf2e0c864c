-- The outbox becomes a watermark in a one-row table: every event at or below `relayed` has been published, and
-- `relayed_beyond` lists the positions above it acknowledged out of order. Appends are serialized on
-- `log_head`, so positions commit in order and the events above the watermark are exactly those waiting. An
-- append then writes no outbox row and an acknowledgement deletes none, so the outbox no longer fills with
-- dead rows between two autovacuums; the watermark has a table of its own so that acknowledgements never wait
-- for the lock appends hold on `log_head`.

CREATE TABLE outbox_watermark (
    id             SMALLINT PRIMARY KEY CHECK (id = 1),
    relayed        BIGINT   NOT NULL,
    relayed_beyond BIGINT[] NOT NULL
);

-- Everything below the oldest event still waiting was published; with nothing waiting, everything was. Events
-- above that which are no longer waiting were acknowledged out of order.
INSERT INTO outbox_watermark (id, relayed, relayed_beyond)
SELECT 1, w.relayed, ARRAY(
    SELECT e.position FROM events e
    WHERE e.position > w.relayed AND e.position NOT IN (SELECT position FROM outbox)
    ORDER BY e.position
)
FROM (
    SELECT COALESCE((SELECT MIN(position) FROM outbox) - 1, (SELECT position FROM log_head WHERE id = 1)) AS relayed
) w;

DROP TABLE outbox;
