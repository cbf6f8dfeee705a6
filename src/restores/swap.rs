//! Restoring over a database without ever leaving it half restored (issue 13).
//!
//! The backup is restored into a new database beside the live one (the *work*
//! database), checked, and only then swapped in: the other sessions are ended,
//! and in ONE transaction on the server the live database is renamed to the kept
//! *previous* name and the work database to the live name. `ALTER DATABASE …
//! RENAME` is transactional, so the name always points at one complete database:
//! the old one until the commit, the restored one after it. If anything fails
//! before the commit, the live database was never touched and the work database
//! is dropped; a failed commit changes nothing.
//!
//! The previous database is kept (`<db>_before_restore_<id>`) until a person drops
//! it ([`DropPrevious`], gated) or `[restores] keep_previous_days` pass; "swap
//! back" ([`SwapBack`], gated) puts it back under the live name the same way.
//!
//! Every name here is made by dbops and quoted with `quote_ident`; values are
//! bound. The connection doing the swap is on the maintenance database
//! (`postgres`, or `template1` when the database itself is called `postgres`): a
//! database cannot be renamed by a session connected to it.
//!
//! Over 600 lines: the all-or-nothing swap (preflight, work database, properties,
//! renames, checks) and its two follow-up actions (swap back, drop previous) share
//! its names and checks.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::{
    approvals::{Action, ExecCtx, Severity},
    config::TargetKind,
    state::{AppState, quote_ident},
    targets::Target,
};

/// How long a swap waits for other sessions to leave when it may not end them.
const WAIT_FOR_SESSIONS: Duration = Duration::from_secs(30);

/// The three names of a swap: the live database, the work database the backup is
/// restored into, and the name the live one is kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub live: String,
    pub work: String,
    pub previous: String,
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A name made of `database` and a suffix, within PostgreSQL's 63 bytes (the
/// database's part is shortened, the suffix never).
fn with_suffix(database: &str, suffix: &str) -> String {
    format!("{}{suffix}", cut(database, 63 - suffix.len()))
}

impl Names {
    /// The names for restore `id` over `database`.
    pub fn for_restore(database: &str, id: i64) -> Names {
        Names {
            live: database.to_string(),
            work: with_suffix(database, &format!("_restoring_{id}")),
            previous: with_suffix(database, &format!("_before_restore_{id}")),
        }
    }

    /// The name a restored database is kept under after a swap back.
    pub fn swapped_out(database: &str, id: i64) -> String {
        with_suffix(database, &format!("_restored_{id}"))
    }
}

/// The database to connect to for renaming and dropping `names`.
fn maintenance_db(avoid: &[&str]) -> &'static str {
    if avoid.contains(&"postgres") {
        "template1"
    } else {
        "postgres"
    }
}

/// A connection to the target's maintenance database, for `within`.
pub async fn admin(
    target: &Target,
    avoid: &[&str],
    within: Duration,
) -> Result<PgConnection, String> {
    super::connect_to(target, maintenance_db(avoid), within)
        .await
        .map_err(|e| {
            format!(
                "cannot connect to the maintenance database {} of {}: {e}",
                maintenance_db(avoid),
                target.name()
            )
        })
}

/// Whether a database called `name` exists on the server.
pub async fn exists_on(c: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(&mut *c)
            .await?
            .is_some(),
    )
}

/// What [`preflight`] found.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// The live database's size.
    pub live_bytes: i64,
    /// Free bytes on the server's data directory, when dbops can see it (the
    /// server is on this machine and dbops may read `data_directory`).
    pub free_bytes: Option<u64>,
}

impl Preflight {
    /// A sentence on disk space, for the result and the page.
    pub fn space_note(&self) -> String {
        let need = crate::fmt::bytes(self.live_bytes);
        match self.free_bytes {
            Some(f) => format!(
                "needs about {need} more on the server for the time both copies exist; {} was free",
                crate::fmt::bytes(f as i64)
            ),
            None => format!(
                "needs about {need} more on the server for the time both copies exist; free space could not be \
                 checked from here (the server is not on this machine, or dbops may not read data_directory)"
            ),
        }
    }
}

/// Everything that can make a swap impossible, checked before anything is
/// touched: the live database exists, the role may create databases and owns
/// (or is superuser over) the live one, the work and previous names are free,
/// and — where the server lets dbops see it — there is room for a second copy.
pub async fn preflight(target: &Target, names: &Names) -> Result<Preflight, String> {
    let scrub = |e: sqlx::Error| target.scrub(&e.to_string());
    let mut c = admin(target, &[&names.live], Duration::from_secs(15)).await?;
    let live: Option<(i64, String)> = sqlx::query_as(
        "SELECT pg_database_size(d.oid), pg_get_userbyid(d.datdba)::text FROM pg_database d WHERE d.datname = $1",
    )
    .bind(&names.live)
    .fetch_optional(&mut c)
    .await
    .map_err(scrub)?;
    let Some((live_bytes, owner)) = live else {
        return Err(format!(
            "there is no database {} on {}: a restore over a database needs the database (restore into a new database instead)",
            names.live,
            target.name()
        ));
    };
    let (superuser, createdb, me): (bool, bool, String) = sqlx::query_as(
        "SELECT rolsuper, rolcreatedb OR rolsuper, current_user::text FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut c)
    .await
    .map_err(scrub)?;
    if !createdb {
        return Err(format!(
            "the role {me} that dbops connects to {} as may not create databases (CREATEDB), so the backup cannot \
             be restored beside {} and swapped in. Grant it CREATEDB, or choose \"in place, in one transaction\" \
             (all-or-nothing, no second copy)",
            target.name(),
            names.live
        ));
    }
    if !superuser && owner != me {
        return Err(format!(
            "the database {} belongs to {owner}, not to {me} (the role dbops connects as): only its owner can rename it \
             for the swap. Connect dbops as {owner}, or choose \"in place, in one transaction\"",
            names.live
        ));
    }
    for taken in [&names.work, &names.previous] {
        if exists_on(&mut c, taken).await.map_err(scrub)? {
            return Err(format!(
                "a database called {taken} already exists on {}: dbops needs that name for this restore. Drop or \
                 rename it first",
                target.name()
            ));
        }
    }
    let free_bytes = free_space(&mut c, target).await;
    let _ = c.close().await;
    if let Some(free) = free_bytes {
        // The copy is about the size of the live database; keep a tenth spare
        // for the WAL the restore writes.
        let need = (live_bytes.max(0) as u64).saturating_add(live_bytes.max(0) as u64 / 10);
        if free < need {
            return Err(format!(
                "the server has {} free but restoring beside {} ({}) needs about {}: nothing was touched. Free some \
                 space, or choose \"in place, in one transaction\"",
                crate::fmt::bytes(free as i64),
                names.live,
                crate::fmt::bytes(live_bytes),
                crate::fmt::bytes(need as i64)
            ));
        }
    }
    Ok(Preflight {
        live_bytes,
        free_bytes,
    })
}

/// Free bytes on the server's data directory, when the server runs on this
/// machine and dbops' role may read `data_directory`; `None` otherwise.
async fn free_space(c: &mut PgConnection, target: &Target) -> Option<u64> {
    use secrecy::ExposeSecret;
    let host = crate::pg_tools::PgConn::from_url(target.config.url.expose_secret())
        .ok()?
        .host;
    let local = host.is_empty()
        || host.starts_with('/')
        || matches!(host.as_str(), "localhost" | "127.0.0.1" | "::1" | "[::1]");
    if !local {
        return None;
    }
    let dir: String = sqlx::query_scalar("SELECT current_setting('data_directory')")
        .fetch_one(&mut *c)
        .await
        .ok()?;
    statvfs_free(std::path::Path::new(&dir))
}

fn statvfs_free(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a zeroed statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Creates the work database like the live one: same encoding, collation and
/// character type (from `template0`, as pg_dump's documentation advises), same
/// owner.
pub async fn create_work(
    c: &mut PgConnection,
    target: &Target,
    names: &Names,
) -> Result<(), String> {
    let scrub = |e: sqlx::Error| target.scrub(&e.to_string());
    let (encoding, collate, ctype, owner): (String, String, String, String) = sqlx::query_as(
        "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text, pg_get_userbyid(datdba)::text
         FROM pg_database WHERE datname = $1",
    )
    .bind(&names.live)
    .fetch_one(&mut *c)
    .await
    .map_err(scrub)?;
    // PostgreSQL 15 added ICU as a database's locale provider.
    let icu: Option<Option<String>> = sqlx::query_scalar(
        "SELECT CASE WHEN datlocprovider = 'i' THEN daticulocale END FROM pg_database WHERE datname = $1",
    )
    .bind(&names.live)
    .fetch_optional(&mut *c)
    .await
    .unwrap_or(None);
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut sql = format!(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        quote_ident(&names.work),
        literal(&encoding),
        literal(&collate),
        literal(&ctype)
    );
    if let Some(Some(icu)) = icu {
        sql.push_str(&format!(
            " LOCALE_PROVIDER icu ICU_LOCALE {}",
            literal(&icu)
        ));
    }
    sqlx::query(&sql).execute(&mut *c).await.map_err(|e| {
        format!(
            "cannot create the database {} to restore into beside {}: {}",
            names.work,
            names.live,
            target.scrub(&e.to_string())
        )
    })?;
    let me: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *c)
        .await
        .map_err(scrub)?;
    if owner != me {
        sqlx::query(&format!(
            "ALTER DATABASE {} OWNER TO {}",
            quote_ident(&names.work),
            quote_ident(&owner)
        ))
        .execute(&mut *c)
        .await
        .map_err(|e| {
            format!(
                "cannot give {} the owner of {} ({owner}): {}",
                names.work,
                names.live,
                target.scrub(&e.to_string())
            )
        })?;
    }
    Ok(())
}

/// Gives the work database what a dump does not carry and the live database has:
/// its privileges (`GRANT … ON DATABASE`), connection limit and per-database
/// settings (`ALTER DATABASE … SET`). Returns what was copied, for the result.
pub async fn copy_properties(
    c: &mut PgConnection,
    target: &Target,
    names: &Names,
) -> Result<Vec<String>, String> {
    let fail = |what: &str, e: sqlx::Error| {
        format!(
            "cannot copy the {what} of {} to the restored database: {}",
            names.live,
            target.scrub(&e.to_string())
        )
    };
    let work = quote_ident(&names.work);
    let mut copied = vec![];
    let has_acl: bool =
        sqlx::query_scalar("SELECT datacl IS NOT NULL FROM pg_database WHERE datname = $1")
            .bind(&names.live)
            .fetch_one(&mut *c)
            .await
            .map_err(|e| fail("privileges", e))?;
    if has_acl {
        // Start from nothing, then grant exactly what the live one grants.
        let grants: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                    a.privilege_type, a.is_grantable
             FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = $1",
        )
        .bind(&names.live)
        .fetch_all(&mut *c)
        .await
        .map_err(|e| fail("privileges", e))?;
        sqlx::query(&format!("REVOKE ALL ON DATABASE {work} FROM PUBLIC"))
            .execute(&mut *c)
            .await
            .map_err(|e| fail("privileges", e))?;
        for (grantee, privilege, grantable) in &grants {
            // Both come from the catalog: privilege_type is a keyword
            // (CONNECT, CREATE, TEMPORARY) and grantee is quoted above.
            if !matches!(privilege.as_str(), "CONNECT" | "CREATE" | "TEMPORARY") {
                continue;
            }
            sqlx::query(&format!(
                "GRANT {privilege} ON DATABASE {work} TO {grantee}{}",
                if *grantable { " WITH GRANT OPTION" } else { "" }
            ))
            .execute(&mut *c)
            .await
            .map_err(|e| fail("privileges", e))?;
        }
        copied.push(format!("{} database privilege(s)", grants.len()));
    }
    let limit: i32 = sqlx::query_scalar("SELECT datconnlimit FROM pg_database WHERE datname = $1")
        .bind(&names.live)
        .fetch_one(&mut *c)
        .await
        .map_err(|e| fail("connection limit", e))?;
    if limit >= 0 {
        sqlx::query(&format!("ALTER DATABASE {work} CONNECTION LIMIT {limit}"))
            .execute(&mut *c)
            .await
            .map_err(|e| fail("connection limit", e))?;
        copied.push(format!("connection limit {limit}"));
    }
    let settings: Vec<(Option<String>, Vec<String>)> = sqlx::query_as(
        "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole)::text END, s.setconfig
         FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = $1",
    )
    .bind(&names.live)
    .fetch_all(&mut *c)
    .await
    .map_err(|e| fail("settings", e))?;
    for (role, config) in settings {
        for item in config {
            let Some((name, value)) = item.split_once('=') else {
                continue;
            };
            // The catalog keeps list settings (search_path) in their SQL form
            // ("$user", public); other values are written as one literal.
            let value = if name == "search_path" {
                value.to_string()
            } else {
                format!("'{}'", value.replace('\'', "''"))
            };
            let sql = format!(
                "ALTER {}DATABASE {work} SET {} TO {value}",
                role.as_deref()
                    .map(|r| format!("ROLE {} IN ", quote_ident(r)))
                    .unwrap_or_default(),
                quote_ident(name)
            );
            sqlx::query(&sql)
                .execute(&mut *c)
                .await
                .map_err(|e| fail("settings", e))?;
            copied.push(format!("setting {name}"));
        }
    }
    Ok(copied)
}

/// Sessions on `databases` other than this one: (pid, application, user).
async fn other_sessions(
    c: &mut PgConnection,
    databases: &[&str],
) -> Result<Vec<(i32, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pid, coalesce(application_name, ''), coalesce(usename::text, '') FROM pg_stat_activity
         WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
    )
    .bind(databases.iter().map(|d| d.to_string()).collect::<Vec<_>>())
    .fetch_all(&mut *c)
    .await
}

/// Renames `from[i]` to `to[i]`, all in one transaction, after ending the
/// sessions on them: every other session when `end_sessions`, else only dbops'
/// own (its target pool) — then it waits up to [`WAIT_FOR_SESSIONS`] for the
/// others to leave. Nothing is renamed unless everything is.
pub async fn rename_all(
    c: &mut PgConnection,
    target: &Target,
    renames: &[(&str, &str)],
    end_sessions: bool,
) -> Result<(), String> {
    let databases: Vec<&str> = renames.iter().map(|(from, _)| *from).collect();
    let deadline = tokio::time::Instant::now() + WAIT_FOR_SESSIONS;
    loop {
        // Sessions on the databases being renamed: everyone's when asked, else
        // dbops' own pool's (application_name dbops, same role).
        let ended: Result<u64, sqlx::Error> = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
             WHERE datname = ANY($1) AND pid <> pg_backend_pid()
               AND ($2 OR (application_name = 'dbops' AND usename = current_user))",
        )
        .bind(databases.iter().map(|d| d.to_string()).collect::<Vec<_>>())
        .bind(end_sessions)
        .fetch_one(&mut *c)
        .await
        .map(|n: i64| n as u64);
        if let Err(e) = ended {
            return Err(format!(
                "cannot end the sessions on {}: {}",
                databases.join(", "),
                target.scrub(&e.to_string())
            ));
        }
        let attempt: Result<(), sqlx::Error> = async {
            let mut tx = c.begin().await?;
            for (from, to) in renames {
                sqlx::query(&format!(
                    "ALTER DATABASE {} RENAME TO {}",
                    quote_ident(from),
                    quote_ident(to)
                ))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }
        .await;
        match attempt {
            Ok(()) => return Ok(()),
            // 55006 object_in_use: someone is (still, or again) connected.
            Err(sqlx::Error::Database(d))
                if d.code().as_deref() == Some("55006")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("55006") => {
                let who = other_sessions(c, &databases).await.unwrap_or_default();
                let apps: Vec<String> = who
                    .iter()
                    .map(|(pid, app, user)| {
                        format!(
                            "{user} ({}, pid {pid})",
                            if app.is_empty() {
                                "no application name"
                            } else {
                                app
                            }
                        )
                    })
                    .take(5)
                    .collect();
                return Err(format!(
                    "{} other session(s) stayed connected to {} for {} s ({}): it cannot be renamed while they are. \
                     Ask again with \"end the other sessions\", or stop those clients",
                    who.len(),
                    databases.join(", "),
                    WAIT_FOR_SESSIONS.as_secs(),
                    apps.join(", ")
                ));
            }
            Err(e) => {
                return Err(format!(
                    "the rename failed and was rolled back: {}",
                    target.scrub(&e.to_string())
                ));
            }
        }
    }
}

/// Drops `name` (ending its sessions); `Ok(false)` when it was not there.
pub async fn drop_database(
    c: &mut PgConnection,
    target: &Target,
    name: &str,
) -> Result<bool, String> {
    if !exists_on(c, name)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?
    {
        return Ok(false);
    }
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(name)
    ))
    .execute(&mut *c)
    .await
    .map_err(|e| {
        format!(
            "cannot drop the database {name}: {}",
            target.scrub(&e.to_string())
        )
    })?;
    Ok(true)
}

/// The tables of a database as `schema.table` (unquoted, as `pg_restore
/// --list` names them), for comparing with a backup's table list.
pub async fn plain_table_names(c: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_'
         ORDER BY 1",
    )
    .fetch_all(&mut *c)
    .await
}

/// Checks a restored work database against what the backup says it holds,
/// before it is swapped in: every table whose data the backup holds is there,
/// and — when the backup's test restore counted them — every table has the same
/// number of rows. Returns a sentence of what was checked.
pub fn check_restored(
    backup: &crate::backups::Backup,
    tables: &[String],
    counts: &BTreeMap<String, i64>,
) -> Result<String, String> {
    let listed: Vec<String> = backup
        .verification
        .as_ref()
        .and_then(|v| v["tables"].as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    // pg_restore --list separates names with spaces, so a name with a space in
    // it is listed cut short: a listed name matches a table it begins.
    let missing: Vec<&String> = listed
        .iter()
        .filter(|l| {
            !tables
                .iter()
                .any(|t| t == *l || t.starts_with(&format!("{l} ")))
        })
        .collect();
    if listed.is_empty() {
        return Ok(
            "the backup recorded no table list to compare with (a plain SQL backup): psql ran it to the end \
             without an error"
                .into(),
        );
    }
    if !missing.is_empty() {
        return Err(format!(
            "the restored copy lacks {} of the backup's {} tables ({}); the live database was not touched",
            missing.len(),
            listed.len(),
            missing
                .iter()
                .take(5)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let recorded = backup
        .verification
        .as_ref()
        .and_then(|v| v["test_restore"]["row_counts"].as_object().cloned());
    let Some(recorded) = recorded else {
        return Ok(format!(
            "all {} tables of the backup are there (the backup recorded no row counts to compare: only backups \
             with a test restore do)",
            listed.len()
        ));
    };
    let differ: Vec<String> = recorded
        .iter()
        .filter_map(|(t, n)| {
            let want = n.as_i64()?;
            let got = counts.get(t).copied();
            (got != Some(want))
                .then(|| format!("{t}: {} restored, {want} in the backup", got.unwrap_or(0)))
        })
        .collect();
    if !differ.is_empty() {
        return Err(format!(
            "the restored copy's row counts differ from the backup's ({}); the live database was not touched",
            differ.into_iter().take(5).collect::<Vec<_>>().join("; ")
        ));
    }
    Ok(format!(
        "all {} tables of the backup are there with the row counts its test restore recorded",
        listed.len()
    ))
}

/// The facts of a swap, for a restore's result.
pub fn facts(names: &Names, preflight: &Preflight, checked: &str, copied: &[String]) -> Value {
    json!({
        "method": "swap",
        "previous_database": names.previous,
        "work_database": names.work,
        "checked": checked,
        "space": preflight.space_note(),
        "copied_properties": copied,
    })
}

/// The restore a swap-back or drop request names, checked against the target
/// it was made on.
async fn restore_of(
    state: &AppState,
    target: &Target,
    params: &Value,
) -> Result<super::Restore, String> {
    let id = params["restore_id"].as_i64().unwrap_or(0);
    let r = super::find(&state.db, id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("There is no restore #{id}."))?;
    if r.target != target.name() {
        return Err(format!(
            "Restore #{id} was on {}, not {}.",
            r.target,
            target.name()
        ));
    }
    Ok(r)
}

fn restore_id_param(form: &BTreeMap<String, String>) -> Result<i64, String> {
    form.get("restore_id")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| "Say which restore: restore_id must be a restore number.".to_string())
}

fn on(form: &BTreeMap<String, String>, key: &str) -> bool {
    form.get(key)
        .map(|v| v.trim().to_lowercase())
        .is_some_and(|v| matches!(v.as_str(), "on" | "true" | "yes" | "1"))
}

/// Size of each named database, for the approver ("12 MB", or "not there").
async fn sizes(target: &Target, names: &[&str]) -> Vec<(String, String)> {
    let Ok(mut c) = admin(target, names, Duration::from_secs(5)).await else {
        return vec![];
    };
    let mut out = vec![];
    for n in names {
        let size: Option<i64> =
            sqlx::query_scalar("SELECT pg_database_size(oid) FROM pg_database WHERE datname = $1")
                .bind(*n)
                .fetch_optional(&mut c)
                .await
                .unwrap_or(None);
        out.push((
            n.to_string(),
            size.map(crate::fmt::bytes)
                .unwrap_or_else(|| "not there".into()),
        ));
    }
    let _ = c.close().await;
    out
}

/// `restore.swap_back`: puts the database a restore replaced back under its
/// name, the same way the restore swapped (sessions ended, both renames in one
/// transaction); the restored database is kept as `<db>_restored_<id>`.
pub struct SwapBack;

impl Action for SwapBack {
    fn kind(&self) -> &'static str {
        "restore.swap_back"
    }

    fn title(&self) -> &'static str {
        "Swap back to the database a restore replaced"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        Ok(
            json!({ "restore_id": restore_id_param(form)?, "end_sessions": on(form, "end_sessions") }),
        )
    }

    fn describe(&self, params: &Value) -> String {
        format!(
            "Swap back restore #{}: the database it replaced (kept since the restore) takes its name again and the \
             restored database is kept under <db>_restored_{}; both renames happen in one transaction. {}",
            params["restore_id"],
            params["restore_id"],
            if params["end_sessions"] == json!(true) {
                "Every session on the database is ended first."
            } else {
                "Other sessions are not ended: the swap waits up to 30 s for them to leave, then fails and changes nothing."
            }
        )
    }

    fn details<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let r = match restore_of(state, target, params).await {
                Ok(r) => r,
                Err(e) => return vec![("Restore".into(), e)],
            };
            let mut out = vec![(
                "Restore".into(),
                format!("#{} of {} over {}", r.id, r.source(), r.database),
            )];
            if let Some(kept) = r.kept_database() {
                for (name, size) in sizes(target, &[&r.database, kept]).await {
                    out.push((name, size));
                }
            }
            out
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let r = restore_of(&ctx.state, &ctx.target, params).await?;
            let Some(kept) = r.kept_database().filter(|_| r.can_swap_back()) else {
                return Err(format!(
                    "Restore #{} has no kept previous database to swap back to (it was swapped back or dropped, or \
                     the restore did not swap). Nothing was changed.",
                    r.id
                ));
            };
            let out = Names::swapped_out(&r.database, r.id);
            let mut c = admin(&ctx.target, &[&r.database, kept], Duration::from_secs(15)).await?;
            let scrub = |e: sqlx::Error| ctx.target.scrub(&e.to_string());
            if !exists_on(&mut c, kept).await.map_err(scrub)? {
                return Err(format!(
                    "The kept database {kept} is not on the server any more. Nothing was changed."
                ));
            }
            if exists_on(&mut c, &out).await.map_err(scrub)? {
                return Err(format!(
                    "A database called {out} already exists: drop or rename it first. Nothing was changed."
                ));
            }
            rename_all(
                &mut c,
                &ctx.target,
                &[(&r.database, &out), (kept, &r.database)],
                params["end_sessions"] == json!(true),
            )
            .await
            .map_err(|e| format!("{e}. Nothing was changed."))?;
            let _ = c.close().await;
            sqlx::query(
                "UPDATE restores SET swapped_back_at = clock_timestamp(), previous_database = $2 WHERE id = $1",
            )
            .bind(r.id)
            .bind(&out)
            .execute(&ctx.state.db)
            .await
            .map_err(|e| e.to_string())?;
            Ok(json!({
                "restore_id": r.id, "database": r.database, "back_from": kept, "restored_kept_as": out,
                "url": format!("/restores/{}", r.id),
            }))
        })
    }
}

/// `restore.drop_previous`: drops the database a restore replaced (or, after a
/// swap back, the restored one) that dbops kept.
pub struct DropPrevious;

impl Action for DropPrevious {
    fn kind(&self) -> &'static str {
        "restore.drop_previous"
    }

    fn title(&self) -> &'static str {
        "Drop the database a restore kept"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        Ok(json!({ "restore_id": restore_id_param(form)? }))
    }

    fn describe(&self, params: &Value) -> String {
        format!(
            "Drop the database that restore #{} kept (DROP DATABASE … WITH (FORCE): its sessions are ended). It \
             cannot be swapped back afterwards; the restore's safety backup, if any, is no longer pinned for it.",
            params["restore_id"]
        )
    }

    fn details<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let r = match restore_of(state, target, params).await {
                Ok(r) => r,
                Err(e) => return vec![("Restore".into(), e)],
            };
            match r.kept_database() {
                Some(kept) => {
                    let mut out = vec![("Dropped".into(), kept.to_string())];
                    out.extend(sizes(target, &[kept]).await);
                    out
                }
                None => vec![("Restore".into(), format!("#{} keeps no database now", r.id))],
            }
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let r = restore_of(&ctx.state, &ctx.target, params).await?;
            let Some(kept) = r.kept_database() else {
                return Err(format!(
                    "Restore #{} keeps no database now. Nothing was dropped.",
                    r.id
                ));
            };
            if kept == r.database {
                return Err("The kept name is the live one; nothing was dropped.".into());
            }
            let mut c = admin(&ctx.target, &[&r.database, kept], Duration::from_secs(15)).await?;
            let dropped = drop_database(&mut c, &ctx.target, kept).await?;
            let _ = c.close().await;
            sqlx::query(
                "UPDATE restores SET previous_dropped_at = clock_timestamp(), previous_dropped_by = $2 WHERE id = $1",
            )
            .bind(r.id)
            .bind(&ctx.audit.actor.name)
            .execute(&ctx.state.db)
            .await
            .map_err(|e| e.to_string())?;
            Ok(
                json!({ "restore_id": r.id, "dropped": kept, "was_there": dropped, "url": format!("/restores/{}", r.id) }),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_names_fit_postgresql_s_63_bytes_and_keep_the_suffix() {
        let n = Names::for_restore("shop", 12);
        assert_eq!(n.work, "shop_restoring_12");
        assert_eq!(n.previous, "shop_before_restore_12");
        let long = "é".repeat(31) + "x"; // 63 bytes
        let n = Names::for_restore(&long, 123_456);
        for name in [&n.work, &n.previous] {
            assert!(name.len() <= 63, "{name}");
        }
        assert!(n.previous.ends_with("_before_restore_123456"));
        assert!(Names::swapped_out("shop", 3).ends_with("_restored_3"));
    }
}
