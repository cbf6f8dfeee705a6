//! A restore's job: checks the artifact again, restores (into a new database,
//! beside the live one and swapped in, or in place in one transaction), counts
//! rows, and writes the end to the restore's row; the job writes the
//! operation and the approval.

use super::*;

/// The job kind of restores.
pub const JOB_KIND: &str = "restore.run";

/// Runs restores as jobs (any dbops replica may take one).
pub struct RestoreJob;

impl JobKind for RestoreJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }

    fn title(&self) -> &'static str {
        "Restore"
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = ctx.job.params["restore_id"]
                .as_i64()
                .ok_or("the job names no restore")?;
            run(&ctx.state, id, &ctx.progress, &ctx.cancel).await
        })
    }

    fn subject(&self, job: &jobs::Job) -> Option<(String, String)> {
        job.params["restore_id"]
            .as_i64()
            .map(|id| (format!("restore #{id}"), format!("/restores/{id}")))
    }

    fn result_url(&self, job: &jobs::Job) -> Option<String> {
        job.params["restore_id"]
            .as_i64()
            .map(|id| format!("/restores/{id}"))
    }
}

/// Runs a queued restore to its end: every outcome is written to the restore's
/// row and returned (the job writes it to the operation and the approval).
pub async fn run(
    state: &AppState,
    id: i64,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    let taken: Option<Restore> = sqlx::query_as(&format!(
        "UPDATE restores SET status = 'running', started_at = clock_timestamp()
         WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(&state.db)
    .await
    .map_err(|e| format!("could not start restore #{id}: {e}"))?;
    let Some(restore) = taken else {
        return Err(format!("restore #{id} is not waiting to run"));
    };
    progress.set_phase("starting");
    progress.set_items_total(restore.progress_total.max(0) as u64);
    let outcome = execute(state, &restore, progress, cancel).await;
    finish(state, restore.id, cancel, &outcome).await;
    outcome
}

#[tracing::instrument(skip_all, fields(restore = r.id, database = %r.database))]
async fn execute(
    state: &AppState,
    r: &Restore,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    use secrecy::ExposeSecret;
    let backup_id = r
        .backup_id
        .ok_or_else(|| format!("restore #{} restores no backup", r.id))?;
    let backup = crate::backups::find(&state.db, backup_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("backup #{backup_id} is gone"))?;
    if backup.status != "good" {
        return Err(format!(
            "backup #{} is {} now: nothing was restored",
            backup.id, backup.status
        ));
    }
    let target = state
        .targets
        .get(&r.target)
        .ok_or_else(|| format!("there is no target called {} any more", r.target))?;
    let storage = state.storage_for(&backup.storage)?;
    let key = backup.storage_key.clone().unwrap_or_default();
    let format = Format::parse(&backup.format).unwrap_or(Format::Custom);

    // 1. The checksum, re-read whole, before anything is created.
    let bytes = reverify(storage.as_ref(), &backup, progress, cancel).await?;

    // 2. The tool for this server.
    progress.set_phase("connecting");
    let pool = target.pg().await?;
    let server_num: i32 = tokio::time::timeout(
        Duration::from_secs(15),
        sqlx::query_scalar("SELECT current_setting('server_version_num')::int").fetch_one(&pool),
    )
    .await
    .map_err(|_| "the target did not answer within 15 s".to_string())?
    .map_err(|e| crate::targets::postgres::describe_pg_error(&target.scrub(&e.to_string())))?;
    // A plain SQL script is fed to psql; archives go to pg_restore.
    let tool_name = if format == Format::Plain {
        "psql"
    } else {
        "pg_restore"
    };
    let tool = pg_tools::pick(tool_name, (server_num / 10000) as u32)?;
    let conn = PgConn::from_url(target.config.url.expose_secret()).map_err(|e| target.scrub(&e))?;

    let mut options: RestoreOptions = serde_json::from_value(r.options.clone()).unwrap_or_default();
    let method = match r.mode.as_str() {
        "over_database" => Some(OverMethod::for_options(format, &options)),
        _ => None,
    };
    if method == Some(OverMethod::InPlace) {
        // In place is only ever all-or-nothing.
        options.single_transaction = true;
    }
    let names = swap::Names::for_restore(&r.database, r.id);
    // The database the backup is restored into: a new one, the work database
    // beside the live one (swap), or the live one itself (in place).
    let into_db = match method {
        Some(OverMethod::Swap) => names.work.clone(),
        _ => r.database.clone(),
    };
    let mut safety = None;
    let mut preflight = None;
    if let Some(method) = method {
        refuse_if_being_backed_up(state, &target, &r.database)
            .await
            .map_err(|e| format!("{e} Nothing was restored."))?;
        // 3a. Everything that could make the swap impossible, before anything
        // is touched.
        if method == OverMethod::Swap {
            progress.set_phase("checking the server");
            preflight = Some(swap::preflight(&target, &names).await.map_err(|e| {
                format!("{e}. Nothing was restored; {} was not touched.", r.database)
            })?);
        }
        sqlx::query(
            "UPDATE restores SET method = $2, work_database = $3, previous_database = $4 WHERE id = $1",
        )
        .bind(r.id)
        .bind(method.as_str())
        .bind((method == OverMethod::Swap).then_some(&names.work))
        .bind((method == OverMethod::Swap).then_some(&names.previous))
        .execute(&state.db)
        .await
        .map_err(|e| e.to_string())?;
        // 3b. A safety backup of the database as it is (dbops backs up a
        // target's own database; another database of it is protected by the
        // kept previous copy alone).
        if r.database == conn.dbname {
            let id = super::over::safety_backup(state, r, progress, cancel).await?;
            safety = Some(id);
        }
        let still: Option<String> = sqlx::query_scalar("SELECT status FROM backups WHERE id = $1")
            .bind(backup.id)
            .fetch_optional(&state.db)
            .await
            .map_err(|e| e.to_string())?;
        if still.as_deref() != Some("good") {
            return Err(format!(
                "backup #{} was removed while the safety backup ran; nothing was restored",
                backup.id
            ));
        }
        if method == OverMethod::InPlace && r.end_sessions {
            progress.set_phase("ending other sessions");
            end_other_sessions(&pool, &target, &r.database, safety).await?;
        }
    }
    // 3c. The database to restore into. If creating a new one fails (it appeared
    // meanwhile), it is not ours and is left alone. Ours from the moment it is
    // asked for: if this restore does not succeed, it (or the sweeper) drops it.
    let creates = method != Some(OverMethod::InPlace);
    if creates {
        sqlx::query("UPDATE restores SET leftover = true WHERE id = $1")
            .bind(r.id)
            .execute(&state.db)
            .await
            .map_err(|e| e.to_string())?;
        progress.set_phase("creating the database");
        let created = match method {
            Some(_) => {
                let mut admin = swap::admin(&target, &[&r.database], WORK_CONNECT).await?;
                let made = swap::create_work(&mut admin, &target, &names).await;
                let _ = sqlx::Connection::close(admin).await;
                made
            }
            None => sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&into_db)))
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "cannot create the database {} (the target's role needs CREATEDB): {}",
                        r.database,
                        target.scrub(&e.to_string())
                    )
                }),
        };
        if let Err(e) = created {
            let _ = sqlx::query("UPDATE restores SET leftover = false WHERE id = $1")
                .bind(r.id)
                .execute(&state.db)
                .await;
            return Err(e);
        }
    }
    let restored = async {
        if !options.schemas.is_empty() && !options.data_only {
            // pg_restore --schema restores what is in a schema, not the schema
            // itself: without this, a schema other than public fails to restore.
            progress.set_phase("creating the schemas");
            let mut c = connect_to(&target, &into_db, WORK_CONNECT).await?;
            for schema in &options.schemas {
                sqlx::query(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    quote_ident(schema)
                ))
                .execute(&mut c)
                .await
                .map_err(|e| {
                    format!(
                        "cannot create the schema {schema}: {}",
                        target.scrub(&e.to_string())
                    )
                })?;
            }
            let _ = sqlx::Connection::close(c).await;
        }
        progress.set_phase("restoring");
        let scratch = state.config.backups.directory.join(".scratch");
        let _ = std::fs::create_dir_all(&scratch);
        let into = conn.with_database(&into_db);
        let extra = options.args();
        let to = RestoreTo {
            tool: &tool,
            conn: &into,
            format,
            jobs: if options.single_transaction {
                1
            } else {
                r.jobs.max(1) as u32
            },
            clean: method == Some(OverMethod::InPlace) && !options.data_only,
            extra: &extra,
            keep_owner: !options.no_owner,
        };
        // A local custom archive as pg_dump wrote it is read in place by a
        // parallel pg_restore (no scratch copy); everything else streams from
        // storage, decompressed on the fly when dbops compressed it (a parallel
        // restore of it decompresses straight into pg_restore's scratch file).
        let in_place = match storage.local_path(&key) {
            Some(path)
                if format == Format::Custom && backup.compression.is_none() && to.jobs > 1 =>
            {
                Some(path)
            }
            _ => None,
        };
        if let Some(path) = in_place {
            pg_tools::restore_archive_file(&to, &path, progress, cancel).await
        } else {
            let mut input = backup.reader(storage.open(&key).await.map_err(|e| e.to_string())?)?;
            if format == Format::Plain {
                pg_tools::restore_plain(
                    &tool,
                    &into,
                    options.single_transaction,
                    &mut input,
                    progress,
                    cancel,
                )
                .await
            } else {
                pg_tools::restore_archive(&to, &mut input, &scratch, progress, cancel).await
            }
        }
        .map_err(|e| target.scrub(&e))?;
        let mut c = connect_to(&target, &into_db, WORK_CONNECT).await?;
        // pg_restore leaves the planner without statistics (and the reports
        // without sizes and row estimates) until autovacuum gets round to it.
        progress.set_phase("analyzing");
        analyze(&mut c, &target).await;
        progress.set_phase("counting rows");
        let counts = crate::backups::run::table_counts(&mut c)
            .await
            .map_err(|e| target.scrub(&e.to_string()))?;
        let mut swap_facts = Value::Null;
        if let Some(pre) = &preflight {
            // 4. The copy is checked before it may replace anything.
            progress.set_phase("checking the restored copy");
            let tables = swap::plain_table_names(&mut c)
                .await
                .map_err(|e| target.scrub(&e.to_string()))?;
            let checked = swap::check_restored(&backup, &tables, &counts)?;
            let _ = sqlx::Connection::close(c).await;
            if cancel.is_cancelled() {
                return Err("stopped before the swap".to_string());
            }
            // 5. The swap: the live database keeps its contents under the
            // previous name, the restored copy takes its name; one transaction.
            progress.set_phase("swapping the restored copy in");
            let mut admin = swap::admin(&target, &[&r.database], WORK_CONNECT).await?;
            let copied = swap::copy_properties(&mut admin, &target, &names).await?;
            swap::rename_all(
                &mut admin,
                &target,
                &[(&names.live, &names.previous), (&names.work, &names.live)],
                r.end_sessions,
            )
            .await?;
            let _ = sqlx::Connection::close(admin).await;
            swap_facts = swap::facts(&names, pre, &checked, &copied);
        } else {
            let _ = sqlx::Connection::close(c).await;
        }
        Ok::<_, String>((counts, swap_facts))
    }
    .await;
    let (counts, swap_facts) = match restored {
        Ok(c) => c,
        Err(e) if !creates => {
            // In place, in one transaction: pg_restore's transaction rolled back.
            return Err(format!(
                "{e}; the restore ran in one transaction, which was rolled back: {} is as it was{}",
                r.database,
                safety
                    .map(|s| format!(" (safety backup #{s})"))
                    .unwrap_or_default()
            ));
        }
        Err(e) => {
            // Leave nothing half restored behind: the new or work database is
            // dropped; a live database was never touched.
            let untouched = if method.is_some() {
                format!("; {} was not touched", r.database)
            } else {
                String::new()
            };
            if let Err(d) = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&into_db)
            ))
            .execute(&pool)
            .await
            {
                tracing::warn!(database = %into_db, error = %d, "could not drop a half-restored database");
                return Err(format!(
                    "{e}{untouched} (and the half-restored database {into_db} could not be dropped: {}; dbops drops it when the server answers again)",
                    target.scrub(&d.to_string())
                ));
            }
            let _ = sqlx::query("UPDATE restores SET leftover = false WHERE id = $1")
                .bind(r.id)
                .execute(&state.db)
                .await;
            return Err(format!("{e}{untouched}"));
        }
    };
    // Restored (and swapped): nothing of this restore is left over.
    sqlx::query(
        "UPDATE restores SET leftover = false,
                swapped_at = CASE WHEN method = 'swap' THEN clock_timestamp() END
         WHERE id = $1",
    )
    .bind(r.id)
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    let mut result = result_json(&backup, &r.database, bytes, &counts);
    result["mode"] = json!(r.mode);
    result["method"] = json!(method.map(OverMethod::as_str));
    result["target"] = json!(r.target);
    result["url"] = json!(format!("/restores/{}", r.id));
    result["safety_backup_id"] = json!(safety);
    if !swap_facts.is_null() {
        result["swap"] = swap_facts;
        result["previous_database"] = json!(names.previous);
    }
    Ok(result)
}

/// `ANALYZE` of a database just restored (or copied), so the planner and the
/// reports have statistics from the first query on.
/// A failure is logged, not fatal: the data is there either way.
pub(crate) async fn analyze(c: &mut sqlx::PgConnection, target: &Target) {
    if let Err(e) = sqlx::query("ANALYZE").execute(&mut *c).await {
        tracing::warn!(target = target.name(), error = %target.scrub(&e.to_string()), "could not analyze a restored database");
    }
}

/// Ends every other session on `database` (an in-place restore, when asked).
async fn end_other_sessions(
    pool: &sqlx::PgPool,
    target: &Target,
    database: &str,
    safety: Option<i64>,
) -> Result<(), String> {
    sqlx::query(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(|e| {
        format!(
            "cannot end the other sessions: {}; nothing was restored{}",
            target.scrub(&e.to_string()),
            safety
                .map(|s| format!(" (safety backup #{s})"))
                .unwrap_or_default()
        )
    })
}

/// The outcome: tables, per-table rows (next to the backup's own counts when
/// its test restore recorded them), and how the totals compare.
fn result_json(
    backup: &Backup,
    database: &str,
    bytes: u64,
    counts: &BTreeMap<String, i64>,
) -> Value {
    let rows: i64 = counts.values().sum();
    let test = backup
        .verification
        .as_ref()
        .map(|v| v["test_restore"].clone())
        .filter(|t| t.is_object());
    let compared = test.as_ref().map(|t| {
        let (tt, tr) = (t["tables"].as_i64(), t["rows"].as_i64());
        if tt == Some(counts.len() as i64) && tr == Some(rows) {
            format!(
                "the same {} tables and {rows} rows as the backup's test restore",
                counts.len()
            )
        } else {
            format!(
                "differs from the backup's test restore ({} tables, {} rows there)",
                tt.unwrap_or(-1),
                tr.unwrap_or(-1)
            )
        }
    });
    json!({
        "database": database,
        "backup_id": backup.id,
        "bytes_read": bytes,
        "tables": counts.len(),
        "rows": rows,
        "row_counts": counts,
        "backup_row_counts": test.as_ref().map(|t| t["row_counts"].clone()),
        "compared_with_test_restore": compared,
    })
}

/// Writes the restore's end to its row (the job writes the operation): also
/// the end of a `pitr.replace`, which is a restore too.
pub(crate) async fn finish(
    state: &AppState,
    id: i64,
    cancel: &CancellationToken,
    outcome: &Result<Value, String>,
) {
    let (status, error, result) = match outcome {
        Ok(v) => ("succeeded", None, Some(v.clone())),
        Err(e) if state.shutdown.is_cancelled() => (
            "interrupted",
            Some(format!("dbops was shut down while this restore ran ({e})")),
            None,
        ),
        Err(e) if cancel.is_cancelled() => {
            ("cancelled", Some(format!("stopped by a person: {e}")), None)
        }
        Err(e) => ("failed", Some(e.clone()), None),
    };
    if let Err(e) = sqlx::query(
        "UPDATE restores SET status = $2, error = $3, result = $4, finished_at = clock_timestamp(), phase = NULL
         WHERE id = $1 AND status = 'running'",
    )
    .bind(id)
    .bind(status)
    .bind(&error)
    .bind(&result)
    .execute(&state.db)
    .await
    {
        tracing::error!(restore = id, error = %e, "could not record the end of a restore");
    }
}
