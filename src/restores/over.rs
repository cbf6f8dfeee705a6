//! Restoring over a live database: the approval action ([`RestoreOver`]), what
//! its approver sees and is approved on, and the safety backup taken first.

use super::*;

/// How a restore over a database replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverMethod {
    /// Restored beside the live database, checked, then swapped in by renaming
    /// (see [`swap`]). For whole restores: the default.
    Swap,
    /// Into the live database with `pg_restore --clean --single-transaction`:
    /// all or nothing, no second copy. For restores of part of a backup
    /// (schemas, tables, schema or data only), or when a person chooses it.
    InPlace,
}

impl OverMethod {
    pub fn for_options(format: Format, options: &RestoreOptions) -> OverMethod {
        if format != Format::Plain && (options.selective() || options.single_transaction) {
            OverMethod::InPlace
        } else {
            OverMethod::Swap
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OverMethod::Swap => "swap",
            OverMethod::InPlace => "in_place",
        }
    }
}

/// Takes a backup of the target with its policy, here and now, before its
/// database is restored over (linked both ways with the restore); returns its
/// id once it is good.
pub(super) async fn safety_backup(
    state: &AppState,
    r: &Restore,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<i64, String> {
    progress.set_phase("safety backup");
    crate::backups::run::safety_backup(state, &r.target, None, Some(r.id), cancel).await
}

/// `restore.over`: restores a good PostgreSQL backup (of this target or another
/// one: a production backup into staging) over a database of this target,
/// after a safety backup of it and, if asked, ending the other sessions on it.
/// Destructive, so it goes through approvals; its execution queues the restore
/// as a job, and the request ends executed or failed with it.
pub struct RestoreOver;

impl RestoreOver {
    fn backup_id(params: &Value) -> i64 {
        params["backup_id"].as_i64().unwrap_or(0)
    }
}

impl crate::approvals::Action for RestoreOver {
    fn kind(&self) -> &'static str {
        "restore.over"
    }

    fn title(&self) -> &'static str {
        "Restore a backup over a database"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> crate::approvals::Severity {
        crate::approvals::Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        let id = crate::backups::backup_id_param(form)?;
        let end_sessions = form
            .get("end_sessions")
            .map(|v| v.trim().to_lowercase())
            .is_some_and(|v| matches!(v.as_str(), "on" | "true" | "yes" | "1"));
        let database = form
            .get("database")
            .map(|d| d.trim())
            .filter(|d| !d.is_empty())
            .map(|d| {
                name_ok("database", d)
                    .map(|_| d.to_string())
                    .map_err(|e| e.replace("“", "The database “"))
            })
            .transpose()?;
        let options = RestoreOptions::from_form(form);
        // Format-specific checks happen when it runs; these are the ones that
        // need no backup.
        options.validate(Format::Custom)?;
        Ok(json!({
            "backup_id": id, "database": database, "end_sessions": end_sessions, "options": options,
        }))
    }

    fn describe(&self, params: &Value) -> String {
        let options: RestoreOptions =
            serde_json::from_value(params["options"].clone()).unwrap_or_default();
        let database = params["database"]
            .as_str()
            .map(|d| format!("the database {d}"))
            .unwrap_or_else(|| "this target's database".into());
        let chosen = options.describe();
        // The method depends on the backup's format too; only a plain backup
        // with part-options is refused, so the archive formats decide here.
        let method = OverMethod::for_options(Format::Custom, &options);
        let how = match method {
            OverMethod::Swap => format!(
                "The backup is restored into a new database beside {database} (pg_restore -j, or psql -v \
                 ON_ERROR_STOP=1 for a plain SQL backup) and checked (every table of the backup there, row counts \
                 equal to its test restore's when it recorded them). Only then is it swapped in: {}, and in one \
                 transaction the live database is renamed to <db>_before_restore_<id> and the restored one takes its \
                 name. Until that moment nothing of the live database is touched; if anything fails, it stays as it \
                 is. Afterwards the database holds exactly what the backup holds; the replaced one is kept (with \
                 everything the backup lacks) until someone drops it, and \"swap back\" restores it. Needs about the \
                 database's size in free space while both exist.",
                if params["end_sessions"] == json!(true) {
                    "every other session on it is ended"
                } else {
                    "other sessions are not ended — the swap waits up to 30 s for them to leave, then fails without \
                     changing anything"
                }
            ),
            OverMethod::InPlace => format!(
                "It restores part of the backup, so it runs in place in ONE transaction (pg_restore --clean --if-exists \
                 --exit-on-error --single-transaction): every object of the chosen part is dropped and re-created, \
                 and if anything fails the whole transaction is rolled back and {database} stays as it was. Objects \
                 the restore does not contain stay. It holds locks on what it replaces until it commits{}.",
                if params["end_sessions"] == json!(true) {
                    "; every other session on the database is ended first"
                } else {
                    ""
                }
            ),
        };
        format!(
            "Restore backup #{} over {database}. The checksum is re-checked and a safety backup of the database is \
             taken first. {how} {}",
            Self::backup_id(params),
            if chosen.is_empty() {
                "Options: the defaults (everything, no owners or privileges).".to_string()
            } else {
                format!("Options: {chosen}.")
            }
        )
    }

    fn details<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> futures::future::BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async move { over_details(state, target, params).await })
    }

    fn world<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> futures::future::BoxFuture<'a, crate::approvals::World> {
        Box::pin(async move { over_world(state, target, params).await })
    }

    fn execute<'a>(
        &'a self,
        ctx: crate::approvals::ExecCtx,
        params: &'a Value,
    ) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            use secrecy::ExposeSecret;
            let id = Self::backup_id(params);
            let end_sessions = params["end_sessions"] == json!(true);
            let options: RestoreOptions = serde_json::from_value(params["options"].clone())
                .map_err(|e| format!("the request's options cannot be read: {e}"))?;
            let state = &ctx.state;
            let b = crate::backups::find(&state.db, id)
                .await
                .map_err(|e| e.to_string())?;
            let target = check_backup(state, b.as_ref(), id, ctx.target.name(), &options)
                .await
                .map_err(|e| format!("{e} Nothing was restored."))?;
            let b = b.expect("checked");
            let database = match params["database"].as_str() {
                Some(d) => d.to_string(),
                None => {
                    PgConn::from_url(target.config.url.expose_secret())
                        .map_err(|e| target.scrub(&e))?
                        .dbname
                }
            };
            refuse_if_being_backed_up(state, &target, &database)
                .await
                .map_err(|e| format!("{e} Nothing was restored."))?;
            let n = NewRestore {
                backup: &b,
                target: target.name(),
                database: &database,
                mode: "over_database",
                jobs: default_jobs(),
                end_sessions,
                options: &options,
                approved: Some((ctx.operation, ctx.approval)),
            };
            let (rid, job) = insert(state, &ctx.audit, n)
                .await
                .map_err(|e| e.to_string())?;
            Ok(json!({
                jobs::HANDED_OFF: job, "restore_id": rid, "database": database,
                "url": format!("/restores/{rid}"),
            }))
        })
    }
}

/// What the approver of a restore over a database sees besides the sentence:
/// the backup (when, size, checksum, source), the database now, and which of its
/// tables will be dropped and re-created or left alone.
async fn over_details(state: &AppState, target: &Target, params: &Value) -> Vec<(String, String)> {
    use secrecy::ExposeSecret;
    let mut out = vec![];
    let id = RestoreOver::backup_id(params);
    let b = match crate::backups::find(&state.db, id).await {
        Ok(Some(b)) => b,
        _ => return vec![("Backup".into(), format!("#{id} does not exist"))],
    };
    out.push((
        "Backup".into(),
        format!(
            "#{} of {}, {} format, {}{}{}",
            b.id,
            b.target,
            b.format,
            b.size(),
            b.finished_at
                .map(|t| format!(", taken {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
                .unwrap_or_default(),
            if b.status == "good" {
                String::new()
            } else {
                format!(" — it is {} now", b.status)
            }
        ),
    ));
    if let Some(s) = &b.sha256 {
        out.push(("SHA-256".into(), s.clone()));
    }
    let Ok(conn) = PgConn::from_url(target.config.url.expose_secret()) else {
        return out;
    };
    let database = params["database"]
        .as_str()
        .map(str::to_string)
        .unwrap_or(conn.dbname);
    // The database as it is now: its size and tables.
    let now: Result<(i64, Vec<(String, i64)>), String> = async {
        let mut c = connect_to(target, &database, Duration::from_secs(5)).await?;
        let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&mut c)
            .await
            .map_err(|e| target.scrub(&e.to_string()))?;
        let tables: Vec<(String, i64)> = sqlx::query_as(
            "SELECT schemaname || '.' || relname, n_live_tup FROM pg_stat_user_tables ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?;
        let _ = sqlx::Connection::close(c).await;
        Ok((size, tables))
    }
    .await;
    let (size, tables) = match now {
        Ok(v) => v,
        Err(e) => {
            out.push((
                "Database".into(),
                format!("{database} on {} — cannot be read now: {e}", target.name()),
            ));
            return out;
        }
    };
    out.push((
        "Database".into(),
        format!(
            "{database} on {} ({}, {} tables)",
            target.name(),
            crate::fmt::bytes(size),
            tables.len()
        ),
    ));
    let options: RestoreOptions =
        serde_json::from_value(params["options"].clone()).unwrap_or_default();
    let method =
        OverMethod::for_options(Format::parse(&b.format).unwrap_or(Format::Custom), &options);
    out.push((
        "How".into(),
        match method {
            OverMethod::Swap => format!(
                "restored beside, checked, then swapped in; the current {database} is kept as \
                 {database}_before_restore_N (N: the restore's number) until someone drops it"
            ),
            OverMethod::InPlace => {
                "in place, in one transaction (rolled back whole if anything fails)".into()
            }
        },
    ));
    if b.format == "plain" {
        out.push((
            "Replaced".into(),
            "the whole database: a plain SQL backup re-creates it from nothing (the current one is kept)".into(),
        ));
        return out;
    }
    let in_backup: Option<Vec<String>> = b
        .verification
        .as_ref()
        .and_then(|v| v["tables"].as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        });
    match in_backup {
        None => out.push((
            "Dropped".into(),
            "every object the backup contains (this backup did not record its table list)".into(),
        )),
        Some(list) => {
            let (replaced, kept): (Vec<_>, Vec<_>) =
                tables.iter().partition(|(t, _)| list.contains(t));
            let show = |v: &[&(String, i64)]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.iter()
                        .map(|(t, n)| format!("{t} (~{n} rows)"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            out.push(("Replaced from the backup".into(), show(&replaced)));
            out.push((
                match method {
                    OverMethod::Swap => {
                        "Not in the backup (kept only in the previous database)".into()
                    }
                    OverMethod::InPlace => "Left as they are".into(),
                },
                show(&kept),
            ));
        }
    }
    out
}

/// What a restore over a database is approved on ([`RestoreOver`]'s
/// `Action::world`): the backup (id, status, checksum) and the sorted table list
/// of the database it replaces (`null` when it cannot be read now). Stops the
/// request when the backup is gone or no longer good.
async fn over_world(state: &AppState, target: &Target, params: &Value) -> crate::approvals::World {
    use secrecy::ExposeSecret;
    let (backup, blocked) =
        crate::backups::actions::backup_facts(state, RestoreOver::backup_id(params)).await;
    let database = params["database"].as_str().map(str::to_string).or_else(|| {
        PgConn::from_url(target.config.url.expose_secret())
            .ok()
            .map(|c| c.dbname)
    });
    let tables: Option<Vec<String>> = match &database {
        None => None,
        Some(d) => async {
            let mut c = connect_to(target, d, Duration::from_secs(5)).await.ok()?;
            let t = sqlx::query_scalar(
                "SELECT (n.nspname || '.' || c.relname)::text COLLATE \"C\" AS t
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
                 ORDER BY t",
            )
            .fetch_all(&mut c)
            .await
            .ok();
            let _ = sqlx::Connection::close(c).await;
            t
        }
        .await,
    };
    crate::approvals::World {
        facts: json!({ "backup": backup, "database": database, "tables": tables }),
        blocked,
    }
}
