-- The outbox becomes a watermark on the head row: every event at or below `relayed` has been published, and
-- `relayed_beyond` lists (as a JSON array) the positions above it acknowledged out of order. An append then
-- writes no outbox row and an acknowledgement deletes none; both touch only the head row, which the append
-- writes anyway.

ALTER TABLE log_head ADD COLUMN relayed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE log_head ADD COLUMN relayed_beyond TEXT NOT NULL DEFAULT '[]';

-- Everything below the oldest event still waiting was published; with nothing waiting, everything was.
UPDATE log_head
SET relayed = COALESCE((SELECT MIN(position) FROM outbox) - 1, position)
WHERE id = 1;

-- Events above the watermark that are no longer waiting were acknowledged out of order.
UPDATE log_head
SET relayed_beyond = (
    SELECT COALESCE(json_group_array(position), '[]')
    FROM (
        SELECT e.position FROM events e
        WHERE e.position > log_head.relayed
          AND e.position NOT IN (SELECT position FROM outbox)
        ORDER BY e.position
    )
)
WHERE id = 1;

DROP TABLE outbox;
