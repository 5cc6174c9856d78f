-- The highest transaction id among the pruned log entries. An entry's created_at is its
-- transaction's start, not its commit: a long transaction's entry can be older than the
-- cut-off yet committed after a listener's last read. A listener whose last snapshot had not
-- seen every transaction up to this id may have lost entries, and must resynchronize.
ALTER TABLE updatepipe.pruned ADD COLUMN pruned_xid xid8;
