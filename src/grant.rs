//! The runtime roles' privileges: what `updatepipe grant` gives a pusher and a listener, and
//! nothing more. `docs/security.md` section 4.3 says why each privilege is there and what a
//! role holding it can still do.

use crate::channel::quote_identifier;
use crate::config::Config;
use crate::error::Error;
use crate::migrate::{MIGRATION_TABLE, check_schema, lock_wait, owner_transaction};
use crate::pg::connect_spawned;
use tokio_postgres::types::Type;

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
/// - A pusher: `INSERT` on the log's columns `channel, origin, seq, payload` only (the
///   server sets `id`, `xid` and `created_at`: a trigger, migration V4), and `EXECUTE` on
///   `updatepipe.logged`, which tells a push retried after a broken connection whether the
///   rows at its numbers are its own.
/// - A listener: `SELECT` on the log (the tail reads, fetches of oversize envelopes), on
///   `updatepipe.pruned` and on `updatepipe.consumers`, and `EXECUTE` on `updatepipe.prune`,
///   `updatepipe.consumer_ack`, `updatepipe.consumer_reset` and `updatepipe.consumer_claim`:
///   pruning,
///   recording how far it pruned, and moving a named consumer, only through those
///   functions of the owner's (migrations V5 and V6). What releases before
///   migration V5 granted listeners (`DELETE` on the log, `INSERT` and `UPDATE` on the
///   marks, enough to lock the log or pin a mark) is taken back.
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
        Role::Pusher => {
            sql.push(format!(
                "GRANT INSERT (channel, origin, seq, payload) ON updatepipe.log TO {r}"
            ));
            sql.push(format!(
                "GRANT EXECUTE ON FUNCTION {LOGGED_FUNCTION} TO {r}"
            ));
        }
        Role::Listener => {
            sql.push(format!("GRANT SELECT ON updatepipe.log TO {r}"));
            sql.push(format!("GRANT SELECT ON updatepipe.pruned TO {r}"));
            sql.push(format!(
                "GRANT EXECUTE ON FUNCTION {PRUNE_FUNCTION}, {CONSUMER_ACK_FUNCTION}, \
                 {CONSUMER_RESET_FUNCTION}, {CONSUMER_CLAIM_FUNCTION} TO {r}"
            ));
            sql.push(format!("GRANT SELECT ON updatepipe.consumers TO {r}"));
            sql.push(format!(
                "REVOKE UPDATE, DELETE, TRUNCATE ON updatepipe.log FROM {r}"
            ));
            sql.push(format!(
                "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON updatepipe.pruned FROM {r}"
            ));
        }
    }
    Ok(sql)
}

/// The owner's function that prunes the log keeping what named consumers have not
/// acknowledged, up to a hold (migration V6), by its signature. (Listeners of releases
/// before it call the two-argument form, which `grant` gave them then.)
const PRUNE_FUNCTION: &str =
    "updatepipe.prune(pg_catalog.text, pg_catalog.float8, pg_catalog.float8)";

/// The owner's functions that move a named consumer forward, or put it at a position
/// (migration V6).
const CONSUMER_ACK_FUNCTION: &str = "updatepipe.consumer_ack(pg_catalog.text, pg_catalog.text, \
     pg_catalog.text, pg_catalog.int8, pg_catalog.text, pg_catalog.int8, pg_catalog.float8, \
     pg_catalog.int8)";
const CONSUMER_CLAIM_FUNCTION: &str = "updatepipe.consumer_claim(pg_catalog.text, pg_catalog.text)";
const CONSUMER_RESET_FUNCTION: &str = "updatepipe.consumer_reset(pg_catalog.text, \
     pg_catalog.text, pg_catalog.text, pg_catalog.int8, pg_catalog.text, pg_catalog.int8, \
     pg_catalog.float8)";

/// The owner's function that tells a pusher whether log rows are its own (migration V5).
const LOGGED_FUNCTION: &str =
    "updatepipe.logged(pg_catalog.text, pg_catalog.text, pg_catalog.int8[], pg_catalog.text[])";

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

/// Applies the grants, in one transaction (the owner's: the migration lock held, waited
/// for within the lock timeout, the search path pinned), as the connecting role (the
/// schema's owner), on a schema migrated as far as this build needs; every role must exist.
pub(crate) async fn grant(config: &Config, roles: &[(&str, Role)]) -> Result<(), Error> {
    for (role, _) in roles {
        check_role_name(role)?;
    }
    let (mut client, connection) = connect_spawned(config.server()).await?;
    let outcome = async {
        let tx = owner_transaction(&mut client, lock_wait(config)).await?;
        check_schema(&tx).await?;
        // A GRANT by a role without the privilege to grant it only warns: check first.
        let row = tx.query_typed_one(OWNS_SQL, &[]).await?;
        if !row.get::<_, Option<bool>>(1).unwrap_or(false) {
            return Err(Error::NotSchemaOwner { role: row.get(0) });
        }
        let names: Vec<&str> = roles.iter().map(|(r, _)| *r).collect();
        let missing = tx
            .query_typed(MISSING_ROLES_SQL, &[(&names, Type::TEXT_ARRAY)])
            .await?;
        if let Some(row) = missing.first() {
            return Err(Error::UnknownRole(row.get(0)));
        }
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

/// Who connects, and whether it owns (or is a member of the owner of) the schema and its
/// tables.
const OWNS_SQL: &str = "\
    SELECT current_user::pg_catalog.text, \
           pg_catalog.bool_and(pg_catalog.pg_has_role(c.relowner, 'USAGE')) \
               AND pg_catalog.bool_and(pg_catalog.pg_has_role(n.nspowner, 'USAGE')) \
    FROM pg_catalog.pg_class c \
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
    WHERE n.nspname OPERATOR(pg_catalog.=) 'updatepipe' \
      AND c.relname OPERATOR(pg_catalog.=) \
          ANY ('{log,pruned,schema_history}'::pg_catalog.name[])";

/// The names of `$1` that are no role's.
const MISSING_ROLES_SQL: &str = "\
    SELECT t.n FROM pg_catalog.unnest($1::pg_catalog.text[]) AS t(n) \
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r \
                      WHERE r.rolname::pg_catalog.text OPERATOR(pg_catalog.=) t.n)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_the_role_and_grants_the_log_columns_only() {
        let sql = grant_statements("a\"b", Role::Pusher).unwrap().join(";\n");
        assert!(sql.contains("TO \"a\"\"b\""), "{sql}");
        assert!(sql.contains("INSERT (channel, origin, seq, payload) ON updatepipe.log"));
        assert!(
            sql.contains("EXECUTE ON FUNCTION updatepipe.logged("),
            "{sql}"
        );
        assert!(!sql.contains("DELETE") && !sql.contains("UPDATE"), "{sql}");
        let sql = grant_statements("l", Role::Listener).unwrap().join(";\n");
        for reserved in ["public", "PUBLIC", "none", "current_user"] {
            assert!(
                grant_statements(reserved, Role::Pusher).is_err(),
                "{reserved}"
            );
        }
        assert!(sql.contains("GRANT SELECT ON updatepipe.log"), "{sql}");
        assert!(
            sql.contains("EXECUTE ON FUNCTION updatepipe.prune("),
            "{sql}"
        );
        // Granted nothing that writes: what earlier releases granted is taken back.
        for line in sql.lines().filter(|l| l.starts_with("GRANT")) {
            assert!(
                !["INSERT", "UPDATE", "DELETE", "CREATE"]
                    .iter()
                    .any(|w| line.contains(w)),
                "{line}"
            );
        }
        assert!(
            sql.contains("REVOKE UPDATE, DELETE, TRUNCATE ON updatepipe.log"),
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
