//! `dbops audit verify`: recomputes the hash chain of the operations log.
//!
//! Every finished row carries `chain_seq` (1, 2, 3, … in the order rows finished),
//! `prev_hash` (the hash of the row before it in that order) and
//! `hash = sha256(prev_hash || operations_canonical(row))`, all written by a trigger
//! in the database. A row changed behind the app's back no longer matches its hash;
//! a removed row leaves a gap in `chain_seq` or a broken link; rows removed from the
//! end no longer reach the chain head.

use sqlx::PgPool;

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Finished rows checked.
    pub checked: i64,
    /// The first problem, as (operation id if known, what is wrong).
    pub first_problem: Option<(Option<i64>, String)>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.first_problem.is_none()
    }
}

/// Walks the whole chain in one streaming query.
pub async fn verify(db: &PgPool) -> Result<VerifyReport, sqlx::Error> {
    let checked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE chain_seq IS NOT NULL")
            .fetch_one(db)
            .await?;

    let unchained: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM operations WHERE outcome <> 'running' AND chain_seq IS NULL ORDER BY id LIMIT 1",
    )
    .fetch_optional(db)
    .await?;
    if let Some(id) = unchained {
        return Ok(VerifyReport {
            checked,
            first_problem: Some((
                Some(id),
                "finished but not in the hash chain (written with the log's triggers switched off)"
                    .into(),
            )),
        });
    }

    let bad: Option<(i64, i64, bool, bool, bool)> = sqlx::query_as(
        r#"SELECT id, chain_seq, seq_ok, link_ok, hash_ok FROM (
               SELECT id, chain_seq,
                      chain_seq = coalesce(lag(chain_seq) OVER w, 0) + 1 AS seq_ok,
                      prev_hash IS NOT DISTINCT FROM coalesce(lag(hash) OVER w, '\x00'::bytea) AS link_ok,
                      hash IS NOT DISTINCT FROM sha256(prev_hash || convert_to(operations_canonical(o), 'UTF8')) AS hash_ok
               FROM operations o
               WHERE chain_seq IS NOT NULL
               WINDOW w AS (ORDER BY chain_seq)
           ) x
           WHERE NOT (seq_ok AND link_ok AND hash_ok)
           ORDER BY chain_seq
           LIMIT 1"#,
    )
    .fetch_optional(db)
    .await?;
    if let Some((id, seq, seq_ok, link_ok, hash_ok)) = bad {
        let what = if !hash_ok {
            format!(
                "its content does not match its hash (chain position {seq}): the row was altered"
            )
        } else if !seq_ok {
            format!(
                "rows before it are missing (chain position {seq} follows a gap): rows were removed"
            )
        } else {
            debug_assert!(!link_ok);
            format!(
                "it does not link to the row before it (chain position {seq}): rows were removed or replaced"
            )
        };
        return Ok(VerifyReport {
            checked,
            first_problem: Some((Some(id), what)),
        });
    }

    let (head_seq, head_ok): (i64, bool) = sqlx::query_as(
        "SELECT h.last_seq,
                h.last_hash = coalesce((SELECT hash FROM operations WHERE chain_seq = h.last_seq), '\\x00'::bytea)
         FROM operations_chain_head h",
    )
    .fetch_one(db)
    .await?;
    let max_seq: Option<i64> = sqlx::query_scalar("SELECT max(chain_seq) FROM operations")
        .fetch_one(db)
        .await?;
    if max_seq.unwrap_or(0) != head_seq || !head_ok {
        return Ok(VerifyReport {
            checked,
            first_problem: Some((
                None,
                format!(
                    "the log ends at chain position {} but the chain head says {head_seq}: the newest rows were removed",
                    max_seq.unwrap_or(0)
                ),
            )),
        });
    }
    Ok(VerifyReport {
        checked,
        first_problem: None,
    })
}
