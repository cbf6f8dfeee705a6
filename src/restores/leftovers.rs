//! What restores leave behind when their dbops died: settling their rows,
//! dropping half-restored databases, resolving a swap cut short, and dropping
//! previous databases whose keeping time is up.

use super::*;

/// Settles restores whose job ended without them: stopped before it started
/// (`cancelled`), or its runner died and the job sweeper ended the job, its
/// operation and its approval (`interrupted`); then finds out on the server
/// what such a restore left ([`drop_leftovers`]) and drops the previous
/// databases whose keeping time is up. Returns how many it ended.
pub async fn sweep(state: &AppState) -> Result<u64, sqlx::Error> {
    let ended: Vec<(i64, String)> = sqlx::query_as(
        "UPDATE restores r SET finished_at = clock_timestamp(), phase = NULL,
                status = CASE WHEN j.status = 'cancelled' AND r.status = 'queued' THEN 'cancelled' ELSE 'interrupted' END,
                error = CASE WHEN j.status = 'cancelled' AND r.status = 'queued' THEN 'stopped before it started'
                        ELSE 'the dbops process running this restore stopped; ' ||
                        CASE WHEN r.mode = 'new_database'
                             THEN 'the half-restored database ' || r.database || ' is dropped by dbops'
                             WHEN r.method = 'in_place'
                             THEN 'its single transaction was rolled back by the server: ' || r.database || ' is as it was'
                             ELSE 'dbops checks on the server whether the swap had happened' END END
         FROM (SELECT r2.id, j2.status FROM restores r2 LEFT JOIN jobs j2 ON j2.id = r2.job_id
               WHERE r2.status IN ('queued', 'running')
                 AND (j2.id IS NULL OR j2.status NOT IN ('queued', 'running'))) j
         WHERE r.id = j.id AND r.status IN ('queued', 'running')
         RETURNING r.id, r.database",
    )
    .fetch_all(&state.db)
    .await?;
    for (id, database) in &ended {
        tracing::warn!(restore = id, database = %database, "restore interrupted: its runner stopped");
    }
    drop_leftovers(state).await;
    drop_expired_previous(state).await;
    Ok(ended.len() as u64)
}

/// A restore that may have left a database on its server.
#[derive(sqlx::FromRow)]
struct Leftover {
    id: i64,
    target: String,
    database: String,
    mode: String,
    work_database: Option<String>,
    previous_database: Option<String>,
}

/// What an ended restore left on its server, found out once the server answers:
/// the new database of a failed restore into a new database is dropped; for a
/// swap whose dbops died, the server says which database the name points at —
/// the work database still there means the swap had not happened (it is
/// dropped; the live database was never touched), the previous name there and
/// the work one gone means it had (recorded as swapped; the previous database is
/// kept). Each is logged (`restore.cleanup`) with the facts, which are also
/// added to the restore's error.
pub async fn drop_leftovers(state: &AppState) {
    let left: Vec<Leftover> = match sqlx::query_as(
        "SELECT id, target, database, mode, work_database, previous_database FROM restores
         WHERE leftover AND status NOT IN ('queued', 'running')",
    )
    .fetch_all(&state.db)
    .await
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for half-restored databases");
            return;
        }
    };
    for l in left {
        let Some(target) = state.targets.get(&l.target) else {
            continue;
        };
        let Ok(mut admin) = swap::admin(&target, &[&l.database], Duration::from_secs(5)).await
        else {
            continue;
        };
        let found = resolve_leftover(&mut admin, &target, &l).await;
        let _ = sqlx::Connection::close(admin).await;
        let (facts, swapped) = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(restore = l.id, error = %e, "a restore's leftover cannot be resolved yet");
                continue;
            }
        };
        let _ = sqlx::query(
            "UPDATE restores SET leftover = false,
                    swapped_at = CASE WHEN $2 THEN coalesce(swapped_at, clock_timestamp()) ELSE swapped_at END,
                    error = CASE WHEN status = 'interrupted' AND mode = 'over_database'
                                 THEN coalesce(error, '') || ' — checked after the restart: ' || $3 ELSE error END
             WHERE id = $1",
        )
        .bind(l.id)
        .bind(swapped)
        .bind(facts["what"].as_str().unwrap_or_default())
        .execute(&state.db)
        .await;
        tracing::info!(restore = l.id, facts = %facts, "resolved what an ended restore left");
        let _ = audit::record(
            &state.db,
            &AuditCtx::system(),
            Entry::new("restore.cleanup")
                .target(l.target.clone())
                .params(json!({ "restore_id": l.id, "database": l.database }))
                .result(facts),
        )
        .await;
    }
}

/// The facts of one leftover (see [`drop_leftovers`]) and whether the swap had
/// happened.
async fn resolve_leftover(
    admin: &mut sqlx::PgConnection,
    target: &Target,
    l: &Leftover,
) -> Result<(Value, bool), String> {
    if l.mode == "new_database" {
        swap::drop_database(admin, target, &l.database).await?;
        return Ok((
            json!({ "dropped": l.database, "what": format!("the half-restored database {} was dropped", l.database) }),
            false,
        ));
    }
    let (Some(work), Some(previous)) = (&l.work_database, &l.previous_database) else {
        return Ok((json!({ "what": "no database had been created" }), false));
    };
    let work_there = swap::exists_on(admin, work)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?;
    let previous_there = swap::exists_on(admin, previous)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?;
    match (work_there, previous_there) {
        (true, false) => {
            swap::drop_database(admin, target, work).await?;
            Ok((
                json!({
                    "swapped": false, "dropped": work,
                    "what": format!("the swap had not happened: {} is as it was, and the half-restored copy {work} was dropped", l.database),
                }),
                false,
            ))
        }
        (false, true) => Ok((
            json!({
                "swapped": true, "previous_database": previous,
                "what": format!("the swap had completed: {} is the restored (and checked) database, and the one it replaced is kept as {previous}", l.database),
            }),
            true,
        )),
        (false, false) => Ok((
            json!({ "swapped": false, "what": format!("the copy had not been created: {} is as it was", l.database) }),
            false,
        )),
        (true, true) => Err(format!(
            "both {work} and {previous} exist on {}: left for a person to look at",
            target.name()
        )),
    }
}

/// Drops the databases restores replaced once `[restores] keep_previous_days`
/// have passed since the swap (logged as `restore.drop_previous` by dbops).
pub async fn drop_expired_previous(state: &AppState) {
    let Some(keep) = state.config.restores.keep_previous else {
        return;
    };
    let due: Vec<(i64, String, String, String)> = match sqlx::query_as(
        "SELECT id, target, database, previous_database FROM restores
         WHERE swapped_at < clock_timestamp() - make_interval(secs => $1)
           AND previous_database IS NOT NULL AND previous_dropped_at IS NULL",
    )
    .bind(keep.as_secs_f64())
    .fetch_all(&state.db)
    .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for previous databases to drop");
            return;
        }
    };
    for (id, target_name, database, previous) in due {
        let Some(target) = state.targets.get(&target_name) else {
            continue;
        };
        let dropped = async {
            let mut admin = swap::admin(&target, &[&database], Duration::from_secs(5)).await?;
            let d = swap::drop_database(&mut admin, &target, &previous).await;
            let _ = sqlx::Connection::close(admin).await;
            d
        }
        .await;
        if let Err(e) = dropped {
            tracing::debug!(restore = id, error = %e, "a previous database cannot be dropped yet");
            continue;
        }
        let _ = sqlx::query(
            "UPDATE restores SET previous_dropped_at = clock_timestamp(), previous_dropped_by = 'dbops (keeping time over)'
             WHERE id = $1",
        )
        .bind(id)
        .execute(&state.db)
        .await;
        let _ = audit::record(
            &state.db,
            &AuditCtx::system(),
            Entry::new("restore.drop_previous")
                .target(target_name.clone())
                .params(json!({ "restore_id": id, "database": previous, "reason": "keep_previous_days passed" }))
                .result(json!({ "dropped": previous })),
        )
        .await;
    }
}
