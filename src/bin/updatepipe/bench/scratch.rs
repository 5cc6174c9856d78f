//! The benchmark's own database: created before the first row, dropped after the last (or
//! on an error, Ctrl-C or SIGTERM), so that the database `bench` is pointed at is left as
//! it was found: no schema, no log rows, and no notifications on its channels.

use anyhow::Context as _;
use updatepipe::Config;

/// A database of the benchmark's own on the server `base` reaches.
pub(super) struct Scratch {
    /// Reaches the database the user named: the new one is created and dropped from there.
    admin: Config,
    name: String,
}

impl Scratch {
    /// Creates the database, from `template0` (which nobody can be connected to, so that a
    /// session on `template1` cannot make it fail, and which holds nothing a role planted).
    pub(super) async fn create(base: &Config) -> anyhow::Result<Scratch> {
        let name = format!("updatepipe_bench_{:08x}", rand::random::<u32>());
        let created = execute(
            base,
            &format!("CREATE DATABASE \"{name}\" TEMPLATE template0"),
        )
        .await;
        match created {
            Ok(()) => {
                eprintln!("bench: working in a database of its own, {name} (dropped when it ends)");
                Ok(Scratch {
                    admin: base.clone(),
                    name,
                })
            }
            Err(e) if not_permitted(&e) => {
                anyhow::bail!(
                    "bench runs in a database of its own, created and dropped on the same \
                     server, so that the one it is pointed at is left as it was; this role may \
                     not create databases: run bench as a role with CREATEDB, or without --url \
                     and DATABASE_URL to let it start a throwaway cluster"
                )
            }
            Err(e) => Err(e).context("creating the benchmark's own database"),
        }
    }

    /// `base`, connecting to the benchmark's database instead.
    pub(super) fn config(&self, base: Config) -> Config {
        base.with_database(&self.name)
    }

    /// Drops the database, ending any session still in it.
    pub(super) async fn drop(self) -> anyhow::Result<()> {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        execute(&self.admin, &sql)
            .await
            .with_context(|| format!("dropping the benchmark's database {}", self.name))
    }
}

/// One statement on a connection of its own.
async fn execute(config: &Config, sql: &str) -> anyhow::Result<()> {
    let (client, connection) = config.connect().await?;
    let task = tokio::spawn(connection);
    let done = client.batch_execute(sql).await;
    drop(client);
    let _ = task.await;
    Ok(done?)
}

/// Whether `e` is the server's refusal for want of a privilege.
fn not_permitted(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}
