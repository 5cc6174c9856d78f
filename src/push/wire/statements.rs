//! The statements that carry a batch (the notifications, and in durable mode the log rows,
//! in one statement: one transaction) and their parameters, built in one place
//! ([`Wire::statement`]) for every way a batch is sent: prepared on a pool connection, or
//! unnamed on any; and the check of a durable batch's rows after a retry.

use std::borrow::Cow;

use tokio_postgres::Statement;
use tokio_postgres::types::Type;

use super::{Payloads, Shape, Wire};
use crate::envelope::{MAX_PAYLOAD_LEN, Marks};
use crate::error::Error;
use crate::log::{LOG_AND_NOTIFY, LOG_AND_NOTIFY_MAPPED};
use crate::push::statement::{Param, PushStatement};

/// One notification: the channel and payload are parameters, never SQL text.
pub(super) const NOTIFY_ONE: &str = "SELECT pg_catalog.pg_notify($1, $2)";

/// Several notifications in one statement, so in one transaction and one round trip, in
/// array order.
pub(super) const NOTIFY_MANY: &str = "SELECT pg_catalog.pg_notify($1, t.p) \
     FROM pg_catalog.unnest($2::pg_catalog.text[]) WITH ORDINALITY AS t(p, n) ORDER BY t.n";

/// The maddy layout: each notification on the channel `$3` names (a maddy copy), or on `$1`
/// where `$3` has none (an envelope), in array order.
pub(super) const NOTIFY_MAPPED: &str = "SELECT pg_catalog.pg_notify(coalesce(t.c, $1), t.p) \
     FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), \
                     pg_catalog.unnest($3::pg_catalog.text[])) \
          WITH ORDINALITY AS t(p, c, n) \
     ORDER BY t.n";

/// How many of a durable batch's envelopes the log holds byte for byte, and how many of its
/// numbers it holds with another payload (an owner's function, migration V5: a pusher may
/// not read the log).
const LOGGED: &str = "SELECT g.same, g.other FROM updatepipe.logged($1, $2, $3, $4) AS g";

/// A connection's prepared statements for this pipe's flights.
#[derive(Debug)]
pub(in crate::push) enum Statements {
    Notify {
        one: Statement,
        many: Statement,
    },
    Durable(Statement),
    /// The maddy layout's: envelopes and copies, each on its channel.
    Mapped(Statement),
    DurableMapped(Statement),
}

impl Statements {
    /// Prepares the statements on `client`, through the pool's statement cache (so a
    /// connection that comes back from the pool does not prepare them again).
    pub(in crate::push) async fn prepare(
        client: &deadpool_postgres::ClientWrapper,
        shape: Shape,
    ) -> Result<Self, tokio_postgres::Error> {
        match shape {
            Shape {
                durable: true,
                copies: true,
            } => {
                return Ok(Statements::DurableMapped(
                    client.prepare_cached(&LOG_AND_NOTIFY_MAPPED).await?,
                ));
            }
            Shape {
                durable: false,
                copies: true,
            } => {
                return Ok(Statements::Mapped(
                    client.prepare_cached(NOTIFY_MAPPED).await?,
                ));
            }
            _ => {}
        }
        if shape.durable {
            return Ok(Statements::Durable(
                client.prepare_cached(LOG_AND_NOTIFY).await?,
            ));
        }
        Ok(Statements::Notify {
            one: client.prepare_cached(NOTIFY_ONE).await?,
            many: client.prepare_cached(NOTIFY_MANY).await?,
        })
    }
}

/// Which statement carries a batch: by the pipe's durability and layout, and for a plain
/// pipe by how many envelopes it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::push) enum Kind {
    /// [`NOTIFY_ONE`]: the channel, the payload.
    NotifyOne,
    /// [`NOTIFY_MANY`]: the channel, the payloads.
    NotifyMany,
    /// [`NOTIFY_MAPPED`]: the channel, the notifications, their channels.
    Mapped,
    /// [`LOG_AND_NOTIFY`]: the channel, the origin, the numbers, the envelopes, the
    /// notifications.
    Durable,
    /// [`LOG_AND_NOTIFY_MAPPED`]: as `Durable`, and the notifications' channels.
    DurableMapped,
}

impl Kind {
    /// The statement's SQL text.
    pub(in crate::push) fn sql(self) -> &'static str {
        match self {
            Kind::NotifyOne => NOTIFY_ONE,
            Kind::NotifyMany => NOTIFY_MANY,
            Kind::Mapped => NOTIFY_MAPPED,
            Kind::Durable => LOG_AND_NOTIFY,
            Kind::DurableMapped => LOG_AND_NOTIFY_MAPPED.as_str(),
        }
    }
}

impl Statements {
    /// The prepared statement of this kind (`None`: not prepared for this pipe's shape).
    fn get(&self, kind: Kind) -> Option<&Statement> {
        match (self, kind) {
            (Statements::Notify { one, .. }, Kind::NotifyOne) => Some(one),
            (Statements::Notify { many, .. }, Kind::NotifyMany) => Some(many),
            (Statements::Durable(statement), Kind::Durable)
            | (Statements::Mapped(statement), Kind::Mapped)
            | (Statements::DurableMapped(statement), Kind::DurableMapped) => Some(statement),
            _ => None,
        }
    }
}

impl Wire {
    /// **The one statement of a batch**, and its parameters: the one place that builds
    /// them, for the pool (prepared or unnamed) and for the caller's connection alike.
    /// In durable mode the envelopes go to the log and their notifications out in the same
    /// statement; in the maddy layout the copies go with the envelopes, each on its
    /// channel.
    pub(in crate::push) fn statement<'p>(
        &'p self,
        payloads: &'p Payloads,
        marks: Marks,
    ) -> PushStatement<'p> {
        let channel = Param::Text(Cow::Borrowed(self.channel.as_str()));
        let envelopes = payloads.envelopes.as_slice();
        let copies = self.maddy.is_some().then_some(payloads.copies.as_slice());
        if self.durable {
            let (seqs, logged, notes) = self.durable_parts(envelopes, marks);
            let mut params = vec![
                channel,
                Param::Text(Cow::Borrowed(self.origin.as_str())),
                Param::Int8Array(seqs),
                logged,
            ];
            let Some(copies) = copies else {
                params.push(Param::TextArray(notes));
                return PushStatement::new(Kind::Durable, params);
            };
            let (notes, channels) = with_copies(notes, copies);
            params.extend([notes, channels]);
            return PushStatement::new(Kind::DurableMapped, params);
        }
        let notes = || envelopes.iter().map(|(_, p)| Cow::Borrowed(p.as_str()));
        if let Some(copies) = copies {
            let (notes, channels) = with_copies(notes().collect(), copies);
            return PushStatement::new(Kind::Mapped, vec![channel, notes, channels]);
        }
        if let [(_, payload)] = envelopes {
            let payload = Param::Text(Cow::Borrowed(payload.as_str()));
            return PushStatement::new(Kind::NotifyOne, vec![channel, payload]);
        }
        let notes = Param::TextArray(notes().collect());
        PushStatement::new(Kind::NotifyMany, vec![channel, notes])
    }

    /// Runs a batch's one statement: prepared on the connection (the fast way), or unnamed
    /// (`None`), with its parameter types, which no transaction-pooling proxy breaks.
    /// Sends before its first await. Nothing to send is no statement.
    pub(in crate::push) async fn execute(
        &self,
        client: &tokio_postgres::Client,
        statements: Option<&Statements>,
        payloads: &Payloads,
        marks: Marks,
    ) -> Result<u64, tokio_postgres::Error> {
        if payloads.envelopes.is_empty() {
            return Ok(0);
        }
        let statement = self.statement(payloads, marks);
        match statements.and_then(|prepared| prepared.get(statement.kind())) {
            Some(prepared) => {
                let params = statement.params().iter().map(Param::to_sql);
                client.execute_raw(prepared, params).await
            }
            None => statement.execute_unnamed(client).await,
        }
    }

    /// After a durable batch met rows at its numbers (a unique violation): whether they are
    /// this batch's own, committed by an earlier try whose answer was lost (`Ok`), or not
    /// ([`Error::NumbersTaken`]: another role wrote at these numbers, and nothing of this
    /// batch was committed). Only the log's own comparison of the payloads, byte for byte,
    /// tells; the number alone proves nothing.
    pub(in crate::push) async fn check_logged_as_sent(
        &self,
        client: &tokio_postgres::Client,
        payloads: &Payloads,
    ) -> Result<(), Error> {
        let envelopes = &payloads.envelopes;
        let first = envelopes.first().map_or(0, |(seq, _)| *seq);
        let seqs: Vec<i64> = envelopes.iter().map(|(seq, _)| *seq as i64).collect();
        let logged: Vec<&str> = envelopes.iter().map(|(_, p)| p.as_str()).collect();
        let row = client
            .query_typed_one(
                LOGGED,
                &[
                    (&self.channel, Type::TEXT),
                    (&self.origin, Type::TEXT),
                    (&seqs, Type::INT8_ARRAY),
                    (&logged, Type::TEXT_ARRAY),
                ],
            )
            .await?;
        let (same, other): (i64, i64) = (row.get(0), row.get(1));
        if other == 0 && same == seqs.len() as i64 {
            return Ok(());
        }
        Err(Error::NumbersTaken { seq: first })
    }

    /// A durable batch's parameters: the numbers and envelopes for the log, and the
    /// notifications, each the envelope itself or, when too large, a reference to it.
    fn durable_parts<'p>(
        &self,
        payloads: &'p [(u64, String)],
        marks: Marks,
    ) -> (Vec<i64>, Param<'p>, Vec<Cow<'p, str>>) {
        let seqs = payloads.iter().map(|(seq, _)| *seq as i64).collect();
        let logged = Param::TextArray(
            payloads
                .iter()
                .map(|(_, p)| Cow::Borrowed(p.as_str()))
                .collect(),
        );
        let notes = payloads
            .iter()
            .map(|(seq, p)| {
                if p.len() <= MAX_PAYLOAD_LEN {
                    Cow::Borrowed(p.as_str())
                } else {
                    Cow::Owned(self.packer.reference(*seq, marks))
                }
            })
            .collect();
        (seqs, logged, notes)
    }
}

/// The notifications of a maddy-layout batch: the envelopes (on the pipe's channel: no
/// channel of their own, NULL) then the copies, with the channels to match.
fn with_copies<'p>(
    mut notes: Vec<Cow<'p, str>>,
    copies: &'p [(String, String)],
) -> (Param<'p>, Param<'p>) {
    let mut channels: Vec<Option<Cow<'p, str>>> = vec![None; notes.len()];
    for (channel, payload) in copies {
        notes.push(Cow::Borrowed(payload.as_str()));
        channels.push(Some(Cow::Borrowed(channel.as_str())));
    }
    (Param::TextArray(notes), Param::NullableTextArray(channels))
}
