//! Building a listener's sub-states without a server, for the unit tests of `dispatch`
//! and `schedule`.

use std::sync::Arc;

use tokio::time::Instant;

use super::super::connector::{LogOpened, Start};
use super::super::heartbeat::{Clock, Heartbeat};
use super::super::intake::Incoming;
use super::super::outbox::Sink;
use super::super::settings::Settings;
use super::Dispatch;
use crate::listen::event::Event;
use crate::log::{Cursor, Place};
use crate::origin::Origin;
use crate::stats::Counters;

impl Dispatch {
    /// The sub-states of a listener on `config`, started now, with its caller's receiver,
    /// which has heard nothing yet (its `Connected` is forgotten), and no server: the pool
    /// the heartbeats would go out on is never used.
    pub(in crate::listen) fn for_tests(
        config: &crate::config::Config,
    ) -> (Dispatch, tokio::sync::mpsc::Receiver<Event>) {
        let settings = Settings::from_config(config);
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let manager = deadpool_postgres::Manager::new(config.pg().clone(), tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(manager).build().unwrap();
        let now = Instant::now();
        let me = Origin::parse("me").unwrap();
        let heartbeat = Heartbeat::new(
            Clock::new(settings.heartbeat_interval(), now),
            crate::envelope::Packer::new(&me, 1, None),
            settings.channel.clone(),
            pool,
            crate::pg::Canceller::new(config.server()).unwrap(),
            settings.connect_timeout,
        );
        let log = settings.durable.then(|| LogOpened {
            place: Place::default(),
            start: Start::At(Cursor::default()),
            epoch: None,
            holder: None,
            standby: false,
        });
        let counters = Arc::new(Counters::default());
        let mut dispatch = Dispatch::new(
            &settings,
            me,
            Sink::Events(tx),
            heartbeat,
            log,
            counters,
            now,
        );
        dispatch.outbox.buffer_clear_for_tests();
        (dispatch, rx)
    }

    /// A notification on the pipe's channel, as if it arrived now.
    pub(in crate::listen) fn incoming_for_tests(&mut self, payload: &str) {
        let channel = self.intake_channel_for_tests();
        self.on_incoming(Incoming {
            channel: &channel,
            payload,
            sender_pid: 1,
        });
    }

    fn intake_channel_for_tests(&self) -> String {
        self.heartbeat.channel_for_tests().to_owned()
    }

    pub(in crate::listen) fn counters_for_tests(&self) -> &Counters {
        &self.counters
    }

    /// As if the log turned out not to be there: references are let go with a resync.
    pub(in crate::listen) fn reader_stop_fetching_for_tests(&mut self) {
        self.reader.stop_fetching();
    }
}
