//! The runtime roles' privileges: what `updatepipe grant` gives a pusher and a listener, and
//! nothing more. `docs/security.md` section 4.3 says why each privilege is there and what a
//! role holding it can still do.

use crate::channel::quote_identifier;
use crate::config::Config;
use crate::connect::connect_spawned;
use crate::error::Error;
use crate::migrate::{MIGRATION_LOCK, MIGRATION_TABLE, check_schema};

/// What a runtime role does with the pipe, for [`grant_statements`] and
/// [`PgPipe::grant`](crate::PgPipe::grant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Pushes, best effort and durable: writes the log's own columns, nothing else.
    Pusher,
    /// Listens, best effort and durable: reads the log and prunes it.
    Listener,
}

/// The statements that give `role` (a role name, quoted here) what a [`Role`] needs, in
/// order. Idempotent: granting twice changes nothing.
///
/// - Both: `USAGE` on schema `updatepipe` (to name anything in it) and `SELECT` on the
///   history table (the schema version check,
///   [`PgPipe::check_schema`](crate::PgPipe::check_schema)).
/// - A pusher: `INSERT` on the log's columns `channel, origin, seq, payload` only; the
///   server sets `id`, `xid` and `created_at` (a trigger, migration V4).
/// - A listener: `SELECT` on the log (the tail reads, fetches of oversize envelopes) and on
///   `updatepipe.pruned`; `DELETE` on the log, `INSERT` and `UPDATE` of `updatepipe.pruned`
///   (pruning, and recording how far it pruned).
///
/// Fails for a name that is no role's: empty, over 63 bytes, with a NUL, or one of the names
/// PostgreSQL reserves (`public`, which even quoted means every role, `none`,
/// `current_user`, `current_role`, `session_user`).
pub fn grant_statements(role: &str, what: Role) -> Result<Vec<String>, Error> {
    check_role_name(role)?;
    let r = quote_identifier(role);
    let mut sql = vec![
        format!("GRANT USAGE ON SCHEMA updatepipe TO {r}"),
        format!("GRANT SELECT ON {MIGRATION_TABLE} TO {r}"),
    ];
    match what {
        Role::Pusher => sql.push(format!(
            "GRANT INSERT (channel, origin, seq, payload) ON updatepipe.log TO {r}"
        )),
        Role::Listener => {
            sql.push(format!("GRANT SELECT, DELETE ON updatepipe.log TO {r}"));
            sql.push(format!(
                "GRANT SELECT, INSERT, UPDATE ON updatepipe.pruned TO {r}"
            ));
        }
    }
    Ok(sql)
}

/// Checks a role name before it goes into SQL text: PostgreSQL would silently shorten a
/// name over 63 bytes to another role's.
fn check_role_name(role: &str) -> Result<(), Error> {
    const RESERVED: [&str; 5] = [
        "public",
        "none",
        "current_user",
        "current_role",
        "session_user",
    ];
    if RESERVED.contains(&role.to_ascii_lowercase().as_str()) {
        return Err(Error::Config(format!(
            "{role:?} is a name PostgreSQL reserves, not a role of yours (\"public\" would \
             grant to every role)"
        )));
    }
    if role.is_empty() || role.len() > 63 || role.contains('\0') {
        return Err(Error::Config(format!(
            "{:?} is not a role name (1 to 63 bytes, no NUL)",
            crate::error::excerpt(role)
        )));
    }
    Ok(())
}

/// Applies the grants, in one transaction, as the connecting role (the schema's owner), on
/// a schema migrated as far as this build needs; every role must exist.
pub(crate) async fn grant(config: &Config, roles: &[(&str, Role)]) -> Result<(), Error> {
    for (role, _) in roles {
        check_role_name(role)?;
    }
    let (mut client, connection) = connect_spawned(config).await?;
    let outcome = async {
        check_schema(&client).await?;
        // A GRANT by a role without the privilege to grant it only warns: check first.
        let row = client
            .query_one(
                "SELECT current_user::text, \
                        bool_and(pg_has_role(c.relowner, 'USAGE')) \
                            AND bool_and(pg_has_role(n.nspowner, 'USAGE')) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'updatepipe' \
                   AND c.relname IN ('log', 'pruned', 'schema_history')",
                &[],
            )
            .await?;
        if !row.get::<_, Option<bool>>(1).unwrap_or(false) {
            return Err(Error::NotSchemaOwner { role: row.get(0) });
        }
        let names: Vec<&str> = roles.iter().map(|(r, _)| *r).collect();
        let missing: Vec<String> = client
            .query(
                "SELECT n FROM unnest($1::text[]) AS t(n) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = n)",
                &[&names],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if let Some(role) = missing.into_iter().next() {
            return Err(Error::UnknownRole(role));
        }
        let tx = client.transaction().await?;
        // One grant or migration at a time: concurrent GRANTs on a table fail.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        for (role, what) in roles {
            for sql in grant_statements(role, *what)? {
                tx.batch_execute(&sql).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
    .await;
    drop(client);
    let _ = connection.await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_the_role_and_grants_the_log_columns_only() {
        let sql = grant_statements("a\"b", Role::Pusher).unwrap().join(";\n");
        assert!(sql.contains("TO \"a\"\"b\""), "{sql}");
        assert!(sql.contains("INSERT (channel, origin, seq, payload) ON updatepipe.log"));
        assert!(!sql.contains("DELETE") && !sql.contains("UPDATE"), "{sql}");
        let sql = grant_statements("l", Role::Listener).unwrap().join(";\n");
        for reserved in ["public", "PUBLIC", "none", "current_user"] {
            assert!(
                grant_statements(reserved, Role::Pusher).is_err(),
                "{reserved}"
            );
        }
        assert!(sql.contains("SELECT, DELETE ON updatepipe.log"), "{sql}");
        assert!(
            !sql.contains("INSERT (") && !sql.contains("CREATE"),
            "{sql}"
        );
    }

    #[test]
    fn refuses_names_postgres_would_shorten() {
        assert!(check_role_name(&"r".repeat(63)).is_ok());
        assert!(check_role_name(&"r".repeat(64)).is_err());
        assert!(check_role_name("").is_err());
    }
}
