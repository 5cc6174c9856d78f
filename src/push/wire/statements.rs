//! The statements that carry a batch (the notifications, and in durable mode the log rows,
//! in one statement: one transaction), prepared on a pool connection or unnamed on any,
//! with their parameters; and the check of a durable batch's rows after a retry.

use std::borrow::Cow;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Statement};

use super::{Payloads, Shape, Wire};
use crate::envelope::{MAX_PAYLOAD_LEN, Marks};
use crate::error::Error;
use crate::log::{LOG_AND_NOTIFY, LOG_AND_NOTIFY_MAPPED};

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

impl Wire {
    /// Runs a batch's one statement: prepared on the connection (the fast way), or unnamed
    /// (`None`), with its parameter types, which no transaction-pooling proxy breaks.
    /// Sends before its first await.
    pub(in crate::push) async fn execute(
        &self,
        client: &tokio_postgres::Client,
        statements: Option<&Statements>,
        payloads: &Payloads,
        marks: Marks,
    ) -> Result<u64, tokio_postgres::Error> {
        let channel = self.channel.as_str();
        let envelopes = &payloads.envelopes;
        match statements {
            None => self.execute_unnamed(client, payloads, marks).await,
            Some(Statements::Durable(statement)) => {
                let (seqs, logged, notes) = self.durable_parts(envelopes, marks);
                client
                    .execute(statement, &[&channel, &self.origin, &seqs, &logged, &notes])
                    .await
            }
            Some(Statements::DurableMapped(statement)) => {
                let (seqs, logged, notes) = self.durable_parts(envelopes, marks);
                let (notes, channels) = with_copies(notes, &payloads.copies);
                let params: [&(dyn ToSql + Sync); 6] =
                    [&channel, &self.origin, &seqs, &logged, &notes, &channels];
                client.execute(statement, &params).await
            }
            Some(Statements::Mapped(statement)) => {
                let notes = envelopes.iter().map(|(_, p)| Cow::Borrowed(p.as_str()));
                let (notes, channels) = with_copies(notes.collect(), &payloads.copies);
                client
                    .execute(statement, &[&channel, &notes, &channels])
                    .await
            }
            Some(Statements::Notify { one, .. }) if envelopes.len() == 1 => {
                client.execute(one, &[&channel, &envelopes[0].1]).await
            }
            Some(Statements::Notify { many, .. }) => {
                let notes: Vec<&str> = envelopes.iter().map(|(_, p)| p.as_str()).collect();
                client.execute(many, &[&channel, &notes]).await
            }
        }
    }

    /// The same statements, unnamed and with their parameter types given, on any client
    /// (the pool's, or the caller's in `push_in`): no transaction-pooling proxy breaks
    /// them. Nothing to send is no statement.
    pub(in crate::push) async fn execute_unnamed<C: GenericClient + Sync>(
        &self,
        client: &C,
        payloads: &Payloads,
        marks: Marks,
    ) -> Result<u64, tokio_postgres::Error> {
        let copies = &payloads.copies;
        let payloads = payloads.envelopes.as_slice();
        if payloads.is_empty() {
            return Ok(0);
        }
        let channel = self.channel.as_str();
        if self.durable && self.maddy.is_some() {
            let (seqs, logged, notes) = self.durable_parts(payloads, marks);
            let (notes, channels) = with_copies(notes, copies);
            let params: [(&(dyn ToSql + Sync), Type); 6] = [
                (&channel, Type::TEXT),
                (&self.origin, Type::TEXT),
                (&seqs, Type::INT8_ARRAY),
                (&logged, Type::TEXT_ARRAY),
                (&notes, Type::TEXT_ARRAY),
                (&channels, Type::TEXT_ARRAY),
            ];
            return client.execute_typed(&LOG_AND_NOTIFY_MAPPED, &params).await;
        }
        if self.maddy.is_some() {
            let notes = payloads.iter().map(|(_, p)| Cow::Borrowed(p.as_str()));
            let (notes, channels) = with_copies(notes.collect(), copies);
            let params: [(&(dyn ToSql + Sync), Type); 3] = [
                (&channel, Type::TEXT),
                (&notes, Type::TEXT_ARRAY),
                (&channels, Type::TEXT_ARRAY),
            ];
            return client.execute_typed(NOTIFY_MAPPED, &params).await;
        }
        if self.durable {
            let (seqs, logged, notes) = self.durable_parts(payloads, marks);
            let params: [(&(dyn ToSql + Sync), Type); 5] = [
                (&channel, Type::TEXT),
                (&self.origin, Type::TEXT),
                (&seqs, Type::INT8_ARRAY),
                (&logged, Type::TEXT_ARRAY),
                (&notes, Type::TEXT_ARRAY),
            ];
            return client.execute_typed(LOG_AND_NOTIFY, &params).await;
        }
        if let [(_, payload)] = payloads {
            return client
                .execute_typed(NOTIFY_ONE, &[(&channel, Type::TEXT), (payload, Type::TEXT)])
                .await;
        }
        let notes: Vec<&str> = payloads.iter().map(|(_, p)| p.as_str()).collect();
        client
            .execute_typed(
                NOTIFY_MANY,
                &[(&channel, Type::TEXT), (&notes, Type::TEXT_ARRAY)],
            )
            .await
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
    ) -> (Vec<i64>, Vec<&'p str>, Vec<Cow<'p, str>>) {
        let seqs = payloads.iter().map(|(seq, _)| *seq as i64).collect();
        let logged = payloads.iter().map(|(_, p)| p.as_str()).collect();
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
/// channel of their own) then the copies, with the channels to match.
fn with_copies<'p>(
    mut notes: Vec<Cow<'p, str>>,
    copies: &'p [(String, String)],
) -> (Vec<Cow<'p, str>>, Vec<Option<&'p str>>) {
    let mut channels: Vec<Option<&str>> = vec![None; notes.len()];
    for (channel, payload) in copies {
        notes.push(Cow::Borrowed(payload.as_str()));
        channels.push(Some(channel.as_str()));
    }
    (notes, channels)
}
