//! Whether the server still holds a durable reader's past: the cluster, database and log it
//! read, and the point in the write-ahead log its cursor was taken at. A failover to a
//! standby that had not received everything, a crash that lost commits made with
//! `synchronous_commit = off`, a backup restored, a log dropped and migrated again: after
//! each, rows the reader delivered may be gone, and rows it never saw may sit below its
//! cursor, where it would never look. Checked on every connect; when the past is not
//! there, the listener raises [`ResyncReason::HistoryChanged`](crate::ResyncReason) and
//! goes on from the server's present (`docs/delivery.md`, "When history moves back").

use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Row};

use super::Cursor;

/// Where a cursor was read: the cluster, the database, the log table, and the timeline
/// (which a promotion changes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Place {
    /// `pg_control_system().system_identifier`: a cluster and its standbys share it.
    pub(crate) system: u64,
    /// The database's OID.
    pub(crate) database: u32,
    /// `updatepipe.log`'s OID: a log dropped and migrated again has another.
    pub(crate) log: u32,
    /// The timeline of the server's write-ahead log.
    pub(crate) timeline: u32,
    /// The channel read (a hash of its name): a position of one channel says nothing of
    /// another's rows.
    pub(crate) channel: u64,
}

/// What the server says of its history when a session opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ServerNow {
    pub(crate) place: Place,
    /// Where the server writes its write-ahead log now.
    pub(crate) insert_lsn: u64,
    /// Where the recovery that made this server a primary ended (`pg_last_wal_replay_lsn()`
    /// of a promoted standby: the point its timeline forked from the old one), until it is
    /// restarted; `None` for a server that started without recovery.
    pub(crate) replay_lsn: Option<u64>,
    /// The next transaction id the server will hand out (epoch included).
    pub(crate) next_xid: u64,
}

/// How the server's history differs from the one a durable reader read: updates it
/// delivered may have been lost, and updates committed since may sit where it would not
/// look. Carried by [`ResyncReason::HistoryChanged`](crate::ResyncReason::HistoryChanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HistoryChange {
    /// Another cluster answers where the reader's was (its system identifier differs): a
    /// new cluster, or another server behind the same address.
    OtherCluster,
    /// Another database, or another log table, in the same cluster: the database or the
    /// `updatepipe` schema was dropped and made again, or restored from a dump.
    OtherLog,
    /// The server's write-ahead log, or its transaction ids, are behind the reader's
    /// position on the same timeline: a crash lost commits made with `synchronous_commit =
    /// off`, or the server is not the one the position was read on.
    Rewound,
    /// A standby was promoted that had not received everything the reader had read: the
    /// failover lost commits (an asynchronous standby promoted after losing the last ones).
    LostInFailover,
    /// The server was promoted (its timeline changed) and can no longer say where its
    /// history forked (it restarted since, or more than one failover happened): whether
    /// commits were lost cannot be checked.
    Unverified,
}

impl std::fmt::Display for HistoryChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HistoryChange::OtherCluster => {
                "another cluster answers (its system identifier differs)"
            }
            HistoryChange::OtherLog => "another database or log table (dropped and made again?)",
            HistoryChange::Rewound => {
                "the server's history is behind the position read (a crash lost commits?)"
            }
            HistoryChange::LostInFailover => {
                "a failover lost commits (the promoted standby had not received them)"
            }
            HistoryChange::Unverified => "the server was promoted and its fork cannot be checked",
        })
    }
}

/// What the server says of its history. Run by a session before it reads the log. On a
/// standby (a polling listener's) the timeline is its last restart point's, and the WAL's
/// position what it replayed (`pg_walfile_name` and the insert position are a primary's).
const SERVER_NOW_SQL: &str = "\
    SELECT s.system_identifier, d.oid, \
           pg_catalog.to_regclass('updatepipe.log')::pg_catalog.oid, \
           CASE WHEN pg_catalog.pg_is_in_recovery() \
                THEN (SELECT pg_catalog.lpad(pg_catalog.to_hex(c.timeline_id), 8, '0') \
                      FROM pg_catalog.pg_control_checkpoint() c) \
                ELSE pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()) END, \
           CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                ELSE pg_catalog.pg_current_wal_insert_lsn() END, \
           pg_catalog.pg_last_wal_replay_lsn(), \
           pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text \
    FROM pg_catalog.pg_control_system() s, pg_catalog.pg_database d \
    WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()";

/// Reads what the server says of its history, for a reader of `channel`.
pub(crate) async fn server_now(
    client: &Client,
    channel: &str,
) -> Result<ServerNow, tokio_postgres::Error> {
    let row = client.query_typed_one(SERVER_NOW_SQL, &[]).await?;
    let mut now = from_row(&row);
    now.place.channel = channel_hash(channel);
    Ok(now)
}

/// A channel's name as a [`Place`] records it (FNV-1a: the same in every build).
pub(crate) fn channel_hash(channel: &str) -> u64 {
    channel.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn from_row(row: &Row) -> ServerNow {
    let walfile: String = row.get(3);
    ServerNow {
        place: Place {
            system: row.get::<_, i64>(0) as u64,
            database: row.get(1),
            log: row.get::<_, Option<u32>>(2).unwrap_or(0),
            timeline: timeline_of(&walfile),
            channel: 0,
        },
        insert_lsn: u64::from(row.get::<_, PgLsn>(4)),
        replay_lsn: row.get::<_, Option<PgLsn>>(5).map(u64::from),
        next_xid: row.get::<_, String>(6).parse().unwrap_or(0),
    }
}

/// The timeline a WAL file's name starts with (eight hex digits).
fn timeline_of(walfile: &str) -> u32 {
    walfile
        .get(..8)
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

/// Whether `server` still holds everything `cursor` was read from: the same cluster,
/// database and log, and a history that contains the cursor's point in it.
///
/// On the cursor's timeline the server's write-ahead log must have reached the cursor's
/// point, and its transaction ids the cursor's. On a later timeline (a promotion), the fork
/// must lie at or past the cursor's point: then the promoted standby had received
/// everything the cursor had seen, and every row written since has a higher id than the
/// cursor's highest (the standby had the sequence's state too).
pub(crate) fn check(cursor: &Cursor, server: &ServerNow) -> Result<(), HistoryChange> {
    let (read, now) = (cursor.place, server.place);
    if read.system != now.system {
        return Err(HistoryChange::OtherCluster);
    }
    if read.database != now.database || read.log != now.log {
        return Err(HistoryChange::OtherLog);
    }
    if read.timeline == now.timeline {
        if server.insert_lsn < cursor.lsn || server.next_xid < cursor.xmax() {
            return Err(HistoryChange::Rewound);
        }
        return Ok(());
    }
    if read.timeline > now.timeline {
        return Err(HistoryChange::Rewound);
    }
    match server.replay_lsn {
        // One promotion, which forked at or past the cursor.
        Some(fork) if now.timeline == read.timeline + 1 && fork >= cursor.lsn => Ok(()),
        Some(_) if now.timeline == read.timeline + 1 => Err(HistoryChange::LostInFailover),
        _ => Err(HistoryChange::Unverified),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: Place = Place {
        system: 7,
        database: 16384,
        log: 16400,
        timeline: 1,
        channel: 9,
    };

    fn cursor(lsn: u64, xmax: u64) -> Cursor {
        Cursor {
            snapshot: format!("{xmax}:{xmax}:"),
            lsn,
            place: HERE,
            ..Cursor::default()
        }
    }

    fn server(place: Place, insert_lsn: u64, replay_lsn: Option<u64>) -> ServerNow {
        ServerNow {
            place,
            insert_lsn,
            replay_lsn,
            next_xid: 1000,
        }
    }

    #[test]
    fn the_same_history_further_on_holds_the_cursor() {
        assert_eq!(check(&cursor(100, 900), &server(HERE, 100, None)), Ok(()));
        assert_eq!(check(&cursor(100, 900), &server(HERE, 5000, None)), Ok(()));
    }

    #[test]
    fn another_cluster_or_log_does_not() {
        let other = Place { system: 8, ..HERE };
        assert_eq!(
            check(&cursor(1, 1), &server(other, 9, None)),
            Err(HistoryChange::OtherCluster)
        );
        for place in [
            Place {
                database: 1,
                ..HERE
            },
            Place { log: 1, ..HERE },
        ] {
            assert_eq!(
                check(&cursor(1, 1), &server(place, 9, None)),
                Err(HistoryChange::OtherLog)
            );
        }
    }

    #[test]
    fn a_history_behind_the_cursor_was_rewound() {
        assert_eq!(
            check(&cursor(100, 900), &server(HERE, 99, None)),
            Err(HistoryChange::Rewound)
        );
        // Transaction ids behind the cursor's, though the WAL moved on.
        assert_eq!(
            check(&cursor(100, 1001), &server(HERE, 500, None)),
            Err(HistoryChange::Rewound)
        );
        let earlier = Place {
            timeline: 0,
            ..HERE
        };
        assert_eq!(
            check(&cursor(1, 1), &server(earlier, 9, None)),
            Err(HistoryChange::Rewound)
        );
    }

    #[test]
    fn a_promotion_holds_the_cursor_only_when_it_forked_past_it() {
        let promoted = Place {
            timeline: 2,
            ..HERE
        };
        // A clean switchover: the standby had everything.
        assert_eq!(
            check(&cursor(100, 900), &server(promoted, 50, Some(100))),
            Ok(())
        );
        assert_eq!(
            check(&cursor(100, 900), &server(promoted, 150, Some(99))),
            Err(HistoryChange::LostInFailover)
        );
        // Restarted since (the fork is forgotten), or two promotions on.
        assert_eq!(
            check(&cursor(100, 900), &server(promoted, 150, None)),
            Err(HistoryChange::Unverified)
        );
        let twice = Place {
            timeline: 3,
            ..HERE
        };
        assert_eq!(
            check(&cursor(100, 900), &server(twice, 150, Some(500))),
            Err(HistoryChange::Unverified)
        );
    }

    #[test]
    fn the_timeline_is_read_from_a_wal_file_name() {
        assert_eq!(timeline_of("00000001000000000000000B"), 1);
        assert_eq!(timeline_of("0000002A000000010000000B"), 42);
        assert_eq!(timeline_of("bad"), 0);
    }
}
