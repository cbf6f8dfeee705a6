//! Grandfather-father-son retention: which good backups a policy keeps. Pure
//! logic on timestamps; [`super::prune`] applies a plan. See [`plan`] for the
//! exact rules, including when retention pauses itself.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveDateTime, Utc};

use super::cron::Zone;

// ---------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------

/// Why a backup is kept; the strings are shown on the backups page.
pub mod reason {
    /// The newest good backup, which retention never deletes.
    pub const NEWEST_GOOD: &str = "newest good";
    /// One of the newest `keep_last` good backups.
    pub const LAST: &str = "last";
    /// The newest good backup of one of the `daily` most recent days with a backup.
    pub const DAILY: &str = "daily";
    /// The newest good backup of one of the `weekly` most recent ISO weeks with a backup.
    pub const WEEKLY: &str = "weekly";
    /// The newest good backup of one of the `monthly` most recent months with a backup.
    pub const MONTHLY: &str = "monthly";
    /// Not covered by the policy, but kept because retention is paused
    /// (see [`super::Plan::held_back`]).
    pub const PAUSED: &str = "retention paused";
    /// Something still needs it: a person's pin, an open request, a running
    /// restore, a kept previous database (see [`crate::backups::pins`]).
    pub const PINNED: &str = "pinned";
}

/// A grandfather-father-son retention policy. See [`plan`] for the semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// Keep the newest this many good backups.
    pub keep_last: u32,
    /// Keep the newest good backup of each of this many most recent days.
    pub daily: u32,
    /// Keep the newest good backup of each of this many most recent ISO weeks.
    pub weekly: u32,
    /// Keep the newest good backup of each of this many most recent months.
    pub monthly: u32,
}

impl Policy {
    /// Refuses a policy that keeps nothing: with every count at zero it would delete
    /// every backup but the newest.
    pub fn validate(&self) -> Result<(), String> {
        if self.keeps_nothing() {
            return Err(
                "a retention policy must keep something: set at least one of \
                        keep last, daily, weekly or monthly above 0"
                    .into(),
            );
        }
        Ok(())
    }

    fn keeps_nothing(&self) -> bool {
        self.keep_last == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == 0
    }

    /// The shortest calendar period the policy counts in, if any.
    fn finest_period(&self) -> Option<Period> {
        [
            (self.daily, Period::Day),
            (self.weekly, Period::Week),
            (self.monthly, Period::Month),
        ]
        .into_iter()
        .find(|(count, _)| *count > 0)
        .map(|(_, period)| period)
    }
}

/// A backup attempt as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: i64,
    pub started_at: DateTime<Utc>,
    /// Finished, verified and listed as good. Failed and interrupted attempts hold no
    /// artifact; pass them anyway so retention can see that backups are failing, but
    /// leave out an attempt that is still running (it would count as a failure).
    pub good: bool,
    /// Something still needs it (see [`crate::backups::pins`]): never deleted.
    pub pinned: bool,
}

/// What retention would do with a set of backups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Good backups to keep, newest first, each with why (see [`reason`]).
    pub keep: Vec<(i64, Vec<&'static str>)>,
    /// Good backups to delete, newest first. Always empty when `held_back` is set.
    pub delete: Vec<i64>,
    /// Why retention deletes nothing this time, as a sentence for the page
    /// ("retention paused: the last 3 backups failed; …").
    pub held_back: Option<String>,
}

impl Plan {
    /// The reasons a backup is kept, or `None` if it is deleted or was not good.
    pub fn reasons(&self, id: i64) -> Option<&[&'static str]> {
        self.keep
            .iter()
            .find(|(kept, _)| *kept == id)
            .map(|(_, reasons)| reasons.as_slice())
    }
}

/// A calendar period, identified by the local date it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Day,
    /// ISO week, Monday to Sunday; its start date identifies (ISO year, week).
    Week,
    Month,
}

impl Period {
    fn start(self, date: NaiveDate) -> NaiveDate {
        let back = match self {
            Period::Day => 0,
            Period::Week => date.weekday().num_days_from_monday(),
            Period::Month => date.day0(),
        };
        date.checked_sub_days(Days::new(back.into()))
            .unwrap_or(date)
    }

    /// The start of the period before the one `date` lies in.
    fn previous_start(self, date: NaiveDate) -> NaiveDate {
        let start = self.start(date);
        start.pred_opt().map_or(start, |day| self.start(day))
    }

    fn previous_name(self) -> &'static str {
        match self {
            Period::Day => "yesterday",
            Period::Week => "last week",
            Period::Month => "last month",
        }
    }
}

/// Decides which good backups a policy keeps and which it deletes.
///
/// Rules, in the order they apply:
/// - Only `good` backups are planned. Failed or interrupted attempts appear in neither
///   `keep` nor `delete` (they hold no artifact; cleaning their rows is the caller's
///   business), but they do count as evidence that backups are failing.
/// - The newest good backup is always kept ([`reason::NEWEST_GOOD`]).
/// - The newest `keep_last` good backups are kept ([`reason::LAST`]).
/// - `daily`/`weekly`/`monthly` = N keeps the newest good backup of each of the N most
///   recent days / ISO weeks (Monday–Sunday) / calendar months **that contain a good
///   backup**, periods taken in `tz` (the borg/restic meaning: a gap in the history
///   does not use up a slot, so old backups are not pushed out by days without
///   backups; `now` plays no part in the counting, only in the pause check below).
///   A backup kept for several rules lists every reason.
/// - Everything else good is deleted, unless retention is paused; then every good
///   backup is kept (the otherwise-deleted ones with [`reason::PAUSED`]), `delete` is
///   empty and `held_back` says why. Retention pauses when:
///   - one or more attempts newer than the newest good backup failed (recent backups
///     are failing: never thin out the old ones meanwhile); this includes having no
///     good backup at all;
///   - the newest good backup is older than the previous period of the policy's
///     finest non-zero GFS rule (daily: it is from before yesterday, in `tz`; weekly:
///     before last ISO week; monthly: before last month), which catches backups that
///     stopped running without leaving failed rows. A `keep_last`-only policy has no
///     period, so only the first check applies;
///   - the policy keeps nothing (all zeros; [`Policy::validate`] refuses it anyway).
pub fn plan(policy: &Policy, backups: &[Candidate], now: DateTime<Utc>, tz: &Zone) -> Plan {
    plan_with(policy, backups, now, |t| tz.local(t), &tz.to_string())
}

/// [`plan`] with the time zone as a function to local time, so tests can use zones
/// this build cannot name.
pub(super) fn plan_with(
    policy: &Policy,
    backups: &[Candidate],
    now: DateTime<Utc>,
    local: impl Fn(DateTime<Utc>) -> NaiveDateTime,
    zone_name: &str,
) -> Plan {
    let mut good: Vec<&Candidate> = backups.iter().filter(|b| b.good).collect();
    // Newest first; the higher id wins a tie so the order is total.
    good.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    let dates: Vec<NaiveDate> = good.iter().map(|b| local(b.started_at).date()).collect();

    let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); good.len()];
    if let Some(newest) = reasons.first_mut() {
        newest.push(reason::NEWEST_GOOD);
    }
    for kept in reasons.iter_mut().take(policy.keep_last as usize) {
        kept.push(reason::LAST);
    }
    for (count, period, why) in [
        (policy.daily, Period::Day, reason::DAILY),
        (policy.weekly, Period::Week, reason::WEEKLY),
        (policy.monthly, Period::Month, reason::MONTHLY),
    ] {
        // Walking newest first, the first backup met in a period is its newest.
        // A set rather than "differs from the previous" because a zone that falls
        // back across midnight can make local dates go backwards for an hour.
        let mut seen = HashSet::new();
        for (kept, date) in reasons.iter_mut().zip(&dates) {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(period.start(*date)) {
                kept.push(why);
            }
        }
    }

    let held_back = hold_reason(
        policy,
        backups,
        good.first().copied(),
        now,
        &local,
        zone_name,
    );
    let mut result = Plan {
        held_back,
        ..Plan::default()
    };
    for (backup, mut why) in good.iter().zip(reasons) {
        if backup.pinned {
            why.push(reason::PINNED);
        }
        if why.is_empty() {
            if result.held_back.is_none() {
                result.delete.push(backup.id);
                continue;
            }
            why.push(reason::PAUSED);
        }
        result.keep.push((backup.id, why));
    }
    result
}

/// Why retention must delete nothing now, if it must (see [`plan`]).
pub(super) fn hold_reason(
    policy: &Policy,
    backups: &[Candidate],
    newest_good: Option<&Candidate>,
    now: DateTime<Utc>,
    local: impl Fn(DateTime<Utc>) -> NaiveDateTime,
    zone_name: &str,
) -> Option<String> {
    const KEEPING: &str = "every good backup is kept until a new backup succeeds";
    if policy.keeps_nothing() {
        return Some(
            "retention paused: the policy keeps nothing (every count is 0); \
             every good backup is kept"
                .into(),
        );
    }
    let failed_since = backups
        .iter()
        .filter(|b| !b.good && newest_good.is_none_or(|good| b.started_at > good.started_at))
        .count();
    match (failed_since, newest_good) {
        (0, _) => {}
        (1, None) => return Some("retention paused: the only backup attempt failed".into()),
        (n, None) => {
            return Some(format!(
                "retention paused: none of the {n} backup attempts succeeded"
            ));
        }
        (1, Some(_)) => {
            return Some(format!(
                "retention paused: the last backup failed; {KEEPING}"
            ));
        }
        (n, Some(_)) => {
            return Some(format!(
                "retention paused: the last {n} backups failed; {KEEPING}"
            ));
        }
    }
    let (newest, period) = (newest_good?, policy.finest_period()?);
    let newest_local = local(newest.started_at);
    if period.start(newest_local.date()) < period.previous_start(local(now).date()) {
        return Some(format!(
            "retention paused: the newest good backup ({} {zone_name}) is from before {}; \
             backups may not be running; {KEEPING}",
            newest_local.format("%Y-%m-%d %H:%M"),
            period.previous_name(),
        ));
    }
    None
}
