//! The schedules' and retention's rules, on timestamps.
//!
//! Over 600 lines: tests only: the schedules' and retention's rules on many
//! timestamps.

use super::cron::*;
use super::retention::*;

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Days, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono::{MappedLocalTime, Weekday};
use croner::Cron;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn date(y: i32, mo: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, mo, d).unwrap()
}

fn good(id: i64, started_at: DateTime<Utc>) -> Candidate {
    Candidate {
        id,
        started_at,
        good: true,
        pinned: false,
    }
}

fn failed(id: i64, started_at: DateTime<Utc>) -> Candidate {
    Candidate {
        id,
        started_at,
        good: false,
        pinned: false,
    }
}

fn schedule(expr: &str) -> Schedule {
    Schedule::parse(expr, "UTC").unwrap()
}

// --- A zone with daylight saving time, for the DST tests ---------------------

/// Central European Time with the EU rules in force since 1996 (the rules of
/// Europe/Berlin): CEST (+02:00) from the last Sunday of March 01:00 UTC to the
/// last Sunday of October 01:00 UTC, CET (+01:00) otherwise.
#[derive(Debug, Clone, Copy)]
struct EuCentral;

fn last_sunday_0100_utc(year: i32, month: u32) -> NaiveDateTime {
    let last = NaiveDate::from_ymd_opt(year, month, 31).unwrap();
    let back = last.weekday().num_days_from_sunday();
    (last - Days::new(back.into()))
        .and_hms_opt(1, 0, 0)
        .unwrap()
}

impl TimeZone for EuCentral {
    type Offset = FixedOffset;

    fn from_offset(_: &FixedOffset) -> Self {
        EuCentral
    }

    fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
        self.offset_from_local_datetime(&local.and_hms_opt(0, 0, 0).unwrap())
    }

    fn offset_from_local_datetime(&self, local: &NaiveDateTime) -> MappedLocalTime<FixedOffset> {
        // Summer time first: the earlier instant of a repeated local time.
        let valid: Vec<FixedOffset> = [2, 1]
            .into_iter()
            .map(|h| FixedOffset::east_opt(h * 3600).unwrap())
            .filter(|off| {
                let utc = *local - chrono::TimeDelta::seconds(off.local_minus_utc().into());
                self.offset_from_utc_datetime(&utc) == *off
            })
            .collect();
        match valid[..] {
            [] => MappedLocalTime::None,
            [one] => MappedLocalTime::Single(one),
            [earlier, later] => MappedLocalTime::Ambiguous(earlier, later),
            _ => unreachable!(),
        }
    }

    fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
        self.offset_from_utc_datetime(&utc.and_hms_opt(0, 0, 0).unwrap())
    }

    fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
        let summer = last_sunday_0100_utc(utc.year(), 3) <= *utc
            && *utc < last_sunday_0100_utc(utc.year(), 10);
        FixedOffset::east_opt(if summer { 7200 } else { 3600 }).unwrap()
    }
}

fn cron(expr: &str) -> Cron {
    // Through Schedule::parse so the same validation applies.
    schedule(expr).cron
}

#[test]
fn the_test_zone_follows_the_eu_rules_of_2024() {
    assert_eq!(
        last_sunday_0100_utc(2024, 3),
        utc(2024, 3, 31, 1, 0).naive_utc()
    );
    assert_eq!(
        last_sunday_0100_utc(2024, 10),
        utc(2024, 10, 27, 1, 0).naive_utc()
    );
    let local = |t: DateTime<Utc>| t.with_timezone(&EuCentral).naive_local();
    assert_eq!(
        local(utc(2024, 1, 15, 12, 0)).to_string(),
        "2024-01-15 13:00:00"
    );
    assert_eq!(
        local(utc(2024, 7, 15, 12, 0)).to_string(),
        "2024-07-15 14:00:00"
    );
}

// --- Zones --------------------------------------------------------------------

#[test]
fn utc_and_fixed_offsets_are_accepted() {
    assert_eq!(Zone::parse("UTC"), Ok(Zone::Utc));
    assert_eq!(Zone::parse("Etc/UTC"), Ok(Zone::Utc));
    assert_eq!(Zone::parse("+00:00"), Ok(Zone::Utc));
    for (text, minutes, shown) in [
        ("+02:00", 120, "+02:00"),
        ("-0530", -330, "-05:30"),
        ("+01", 60, "+01:00"),
        ("+14:00", 840, "+14:00"),
    ] {
        let zone = Zone::parse(text).unwrap();
        assert_eq!(
            zone,
            Zone::Fixed(FixedOffset::east_opt(minutes * 60).unwrap())
        );
        assert_eq!(zone.to_string(), shown);
    }
}

#[test]
fn malformed_offsets_and_unknown_zones_are_refused_with_the_name() {
    for bad in [
        "+15:00",
        "+02:60",
        "+2",
        "+02:0",
        "-ab:cd",
        "+",
        "+Gǡ\u{1a}",
        "-é12",
    ] {
        let err = Zone::parse(bad).unwrap_err();
        assert!(err.contains(&format!("`{bad}`")), "{err}");
    }
    let err = Zone::parse("Mars/Olympus").unwrap_err();
    assert!(
        err.starts_with("time zone `Mars/Olympus` is not known"),
        "{err}"
    );
}

// --- Schedule parsing -----------------------------------------------------------

#[test]
fn an_out_of_range_value_is_named_with_its_field() {
    for (expr, message) in [
        (
            "61 2 * * *",
            "`61 2 * * *`: minute 61 is out of range (0-59)",
        ),
        ("0 24 * * *", "`0 24 * * *`: hour 24 is out of range (0-23)"),
        (
            "0 2 32 * *",
            "`0 2 32 * *`: day-of-month 32 is out of range (1-31)",
        ),
        (
            "0 2 0 * *",
            "`0 2 0 * *`: day-of-month 0 is out of range (1-31)",
        ),
        (
            "0 2 * 13 *",
            "`0 2 * 13 *`: month 13 is out of range (1-12 or JAN-DEC)",
        ),
        (
            "0 2 * * 1-8",
            "`0 2 * * 1-8`: day-of-week 8 is out of range (0-7 or SUN-SAT)",
        ),
        (
            "0,75 2 * * *",
            "`0,75 2 * * *`: minute 75 is out of range (0-59)",
        ),
    ] {
        assert_eq!(Schedule::parse(expr, "UTC").unwrap_err(), message);
    }
}

#[test]
fn a_syntax_error_is_reported_with_its_field() {
    let err = Schedule::parse("*/x 2 * * *", "UTC").unwrap_err();
    assert!(
        err.starts_with("`*/x 2 * * *`: minute field `*/x` is invalid"),
        "{err}"
    );
    let err = Schedule::parse("0 2 * * FUNDAY", "UTC").unwrap_err();
    assert!(
        err.contains("day-of-week field `FUNDAY` is invalid"),
        "{err}"
    );
}

#[test]
fn the_wrong_number_of_fields_is_refused() {
    assert_eq!(
        Schedule::parse("0 2 * *", "UTC").unwrap_err(),
        "`0 2 * *`: expected 5 fields (minute hour day-of-month month day-of-week), found 4"
    );
    let err = Schedule::parse("0 0 2 * * *", "UTC").unwrap_err();
    assert!(
        err.ends_with("found 6 (a seconds field is not supported)"),
        "{err}"
    );
    assert!(Schedule::parse("  ", "UTC").unwrap_err().contains("empty"));
}

#[test]
fn a_pattern_that_never_fires_is_refused() {
    assert_eq!(
        Schedule::parse("0 0 30 2 *", "UTC").unwrap_err(),
        "`0 0 30 2 *` never matches a real date"
    );
    // February 29 does exist.
    assert!(Schedule::parse("0 0 29 2 *", "UTC").is_ok());
}

#[test]
fn aliases_expand_to_their_usual_meaning() {
    let t = utc(2024, 5, 15, 10, 20); // a Wednesday
    assert_eq!(
        schedule("@hourly").next_after(t),
        Some(utc(2024, 5, 15, 11, 0))
    );
    assert_eq!(
        schedule("@daily").next_after(t),
        Some(utc(2024, 5, 16, 0, 0))
    );
    assert_eq!(
        schedule("@WEEKLY").next_after(t),
        Some(utc(2024, 5, 19, 0, 0))
    );
    assert_eq!(
        schedule("@monthly").next_after(t),
        Some(utc(2024, 6, 1, 0, 0))
    );
    assert_eq!(
        schedule("@yearly").next_after(t),
        Some(utc(2025, 1, 1, 0, 0))
    );
    assert_eq!(schedule("@daily").expr(), "@daily");
    let err = Schedule::parse("@fortnightly", "UTC").unwrap_err();
    assert!(
        err.starts_with("`@fortnightly` is not a known alias"),
        "{err}"
    );
}

#[test]
fn names_steps_and_lists_are_understood() {
    let s = schedule("15 1-5/2 * * MON-FRI");
    let t = utc(2024, 5, 17, 4, 0); // Friday
    assert_eq!(
        s.next_n(t, 3),
        vec![
            utc(2024, 5, 17, 5, 15),
            utc(2024, 5, 20, 1, 15),
            utc(2024, 5, 20, 3, 15)
        ]
    );
}

// --- Schedule evaluation --------------------------------------------------------

#[test]
fn next_after_is_strictly_after_the_given_instant() {
    let s = schedule("0 2 * * *");
    assert_eq!(
        s.next_after(utc(2024, 5, 1, 1, 59)),
        Some(utc(2024, 5, 1, 2, 0))
    );
    assert_eq!(
        s.next_after(utc(2024, 5, 1, 2, 0)),
        Some(utc(2024, 5, 2, 2, 0))
    );
    let just_after = utc(2024, 5, 1, 2, 0) + chrono::TimeDelta::milliseconds(500);
    assert_eq!(s.next_after(just_after), Some(utc(2024, 5, 2, 2, 0)));
    let just_before = utc(2024, 5, 1, 2, 0) - chrono::TimeDelta::milliseconds(500);
    assert_eq!(s.next_after(just_before), Some(utc(2024, 5, 1, 2, 0)));
}

#[test]
fn a_schedule_is_evaluated_in_its_zone() {
    let s = Schedule::parse("0 2 * * *", "+02:00").unwrap();
    assert_eq!(
        s.next_after(utc(2024, 5, 1, 12, 0)),
        Some(utc(2024, 5, 2, 0, 0))
    );
    assert_eq!(s.to_string(), "0 2 * * * (+02:00)");
    // Day-of-week is the local day too: Monday 00:30 at +02:00 is Sunday in UTC.
    let monday = Schedule::parse("30 0 * * MON", "+02:00").unwrap();
    assert_eq!(
        monday.next_after(utc(2024, 5, 15, 0, 0)),
        Some(utc(2024, 5, 19, 22, 30))
    );
}

#[test]
fn next_n_lists_the_upcoming_runs_in_order() {
    let s = schedule("0 */6 * * *");
    assert_eq!(
        s.next_n(utc(2024, 5, 1, 5, 0), 4),
        vec![
            utc(2024, 5, 1, 6, 0),
            utc(2024, 5, 1, 12, 0),
            utc(2024, 5, 1, 18, 0),
            utc(2024, 5, 2, 0, 0)
        ]
    );
    assert!(s.next_n(utc(2024, 5, 1, 5, 0), 0).is_empty());
}

#[test]
fn a_tick_that_spans_a_scheduled_instant_makes_it_due() {
    let s = schedule("0 2 * * *");
    let at = utc(2024, 5, 1, 2, 0);
    assert_eq!(
        s.due_between(utc(2024, 5, 1, 1, 59), utc(2024, 5, 1, 2, 0)),
        Some(at)
    );
    assert_eq!(
        s.due_between(utc(2024, 5, 1, 1, 59), utc(2024, 5, 1, 2, 1)),
        Some(at)
    );
    // Ticking replicas with different boundaries agree on the key.
    assert_eq!(
        s.due_between(
            utc(2024, 5, 1, 1, 59,),
            utc(2024, 5, 1, 2, 0) + chrono::TimeDelta::seconds(7)
        ),
        Some(at)
    );
}

#[test]
fn a_tick_that_spans_no_scheduled_instant_runs_nothing() {
    let s = schedule("0 2 * * *");
    assert_eq!(
        s.due_between(utc(2024, 5, 1, 2, 0), utc(2024, 5, 1, 2, 1)),
        None
    );
    assert_eq!(
        s.due_between(utc(2024, 5, 1, 2, 1), utc(2024, 5, 2, 1, 59)),
        None
    );
    // An empty or reversed interval is never due.
    assert_eq!(
        s.due_between(utc(2024, 5, 1, 2, 0), utc(2024, 5, 1, 2, 0)),
        None
    );
    assert_eq!(
        s.due_between(utc(2024, 5, 1, 3, 0), utc(2024, 5, 1, 1, 0)),
        None
    );
}

#[test]
fn consecutive_ticks_make_each_instant_due_exactly_once() {
    let s = schedule("*/5 * * * *");
    let start = utc(2024, 5, 1, 0, 0);
    let ticks: Vec<_> = (0..=60)
        .map(|i| start + chrono::TimeDelta::seconds(i * 37))
        .collect();
    let due: Vec<_> = ticks
        .windows(2)
        .filter_map(|w| s.due_between(w[0], w[1]))
        .collect();
    let expected: Vec<_> = (1..=7)
        .map(|i| start + chrono::TimeDelta::minutes(i * 5))
        .collect();
    assert_eq!(due, expected); // 60 ticks × 37 s = 37 min: 00:05 … 00:35
}

#[test]
fn a_tick_after_downtime_runs_only_the_latest_missed_instant() {
    let s = schedule("0 * * * *");
    assert_eq!(
        s.due_between(utc(2024, 5, 1, 0, 30), utc(2024, 5, 1, 5, 10)),
        Some(utc(2024, 5, 1, 5, 0))
    );
}

// --- Daylight saving time (EU rules, as Europe/Berlin) ---------------------------

#[test]
fn a_daily_time_in_the_skipped_hour_runs_right_after_the_gap() {
    // 2024-03-31: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    let runs = next_n_in(&cron("30 2 * * *"), &EuCentral, utc(2024, 3, 29, 12, 0), 3);
    assert_eq!(
        runs,
        vec![
            utc(2024, 3, 30, 1, 30), // 02:30 CET
            utc(2024, 3, 31, 1, 0),  // 03:00 CEST, first valid time after the gap
            utc(2024, 4, 1, 0, 30),  // 02:30 CEST
        ]
    );
}

#[test]
fn hourly_runs_inside_the_skipped_hour_are_dropped() {
    let runs = next_n_in(&cron("30 * * * *"), &EuCentral, utc(2024, 3, 31, 0, 0), 2);
    // 01:30 CET, then 03:30 CEST; 02:30 local never happens.
    assert_eq!(runs, vec![utc(2024, 3, 31, 0, 30), utc(2024, 3, 31, 1, 30)]);
}

#[test]
fn a_daily_time_in_the_repeated_hour_runs_once() {
    // 2024-10-27: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    let runs = next_n_in(&cron("30 2 * * *"), &EuCentral, utc(2024, 10, 26, 12, 0), 2);
    assert_eq!(
        runs,
        vec![
            utc(2024, 10, 27, 0, 30), // 02:30 CEST, the first occurrence only
            utc(2024, 10, 28, 1, 30), // 02:30 CET
        ]
    );
}

#[test]
fn hourly_runs_in_the_repeated_hour_run_at_each_occurrence() {
    let c = cron("30 * * * *");
    let runs = next_n_in(&c, &EuCentral, utc(2024, 10, 26, 23, 0), 4);
    assert_eq!(
        runs,
        vec![
            utc(2024, 10, 26, 23, 30), // 01:30 CEST
            utc(2024, 10, 27, 0, 30),  // 02:30 CEST
            utc(2024, 10, 27, 1, 30),  // 02:30 CET
            utc(2024, 10, 27, 2, 30),  // 03:30 CET
        ]
    );
    // Each occurrence is its own due instant, so run keys stay unique.
    let due = |from, to| due_between_in(&c, &EuCentral, from, to);
    assert_eq!(
        due(utc(2024, 10, 27, 0, 0), utc(2024, 10, 27, 1, 0)),
        Some(runs[1])
    );
    assert_eq!(
        due(utc(2024, 10, 27, 1, 0), utc(2024, 10, 27, 2, 0)),
        Some(runs[2])
    );
}

// --- Policy ---------------------------------------------------------------------

#[test]
fn a_policy_that_keeps_nothing_is_refused() {
    assert!(
        Policy::default()
            .validate()
            .unwrap_err()
            .contains("must keep something")
    );
    for policy in [
        Policy {
            keep_last: 1,
            ..Policy::default()
        },
        Policy {
            daily: 1,
            ..Policy::default()
        },
        Policy {
            weekly: 1,
            ..Policy::default()
        },
        Policy {
            monthly: 1,
            ..Policy::default()
        },
    ] {
        assert_eq!(policy.validate(), Ok(()));
    }
}

#[test]
fn a_pinned_backup_is_kept_whatever_the_policy_says() {
    let now = utc(2024, 5, 10, 12, 0);
    let mut backups: Vec<_> = (1..=5)
        .map(|d| good(d, utc(2024, 5, d as u32 + 4, 1, 0)))
        .collect();
    backups[0].pinned = true;
    let policy = Policy {
        keep_last: 2,
        ..Policy::default()
    };
    let p = plan(&policy, &backups, now, &Zone::Utc);
    assert_eq!(p.delete, vec![3, 2]);
    assert_eq!(p.reasons(1), Some(&[reason::PINNED][..]));
}

#[test]
fn planning_with_a_policy_that_keeps_nothing_deletes_nothing() {
    let now = utc(2024, 5, 10, 12, 0);
    let backups: Vec<_> = (1..=5)
        .map(|d| good(d, utc(2024, 5, d as u32 + 5, 1, 0)))
        .collect();
    let p = plan(&Policy::default(), &backups, now, &Zone::Utc);
    assert!(p.delete.is_empty());
    assert_eq!(p.keep.len(), 5);
    assert!(p.held_back.unwrap().contains("the policy keeps nothing"));
}

// --- Retention plans ------------------------------------------------------------

/// One good backup a day at 01:00 UTC through 2024 (a leap year): id 1 is
/// 2024-01-01, id 366 is 2024-12-31.
fn year_of_daily_backups() -> Vec<Candidate> {
    (1..=366)
        .map(|id| good(id, utc(2024, 1, 1, 1, 0) + Days::new(id as u64 - 1)))
        .collect()
}

fn id_on(backups: &[Candidate], day: NaiveDate) -> i64 {
    let mut on_day = backups.iter().filter(|b| b.started_at.date_naive() == day);
    let found = on_day.next().unwrap().id;
    assert!(on_day.next().is_none());
    found
}

const GFS: Policy = Policy {
    keep_last: 3,
    daily: 7,
    weekly: 4,
    monthly: 6,
};

#[test]
fn a_year_of_daily_backups_keeps_the_expected_generations() {
    let backups = year_of_daily_backups();
    let now = utc(2024, 12, 31, 12, 0); // a Tuesday
    let p = plan(&GFS, &backups, now, &Zone::Utc);
    assert_eq!(p.held_back, None);

    // Worked out on a calendar:
    // last 3:  Dec 31, 30, 29
    // daily 7: Dec 31 … Dec 25
    // weekly 4 (ISO weeks, Monday–Sunday): 2025-W01 (Dec 30–Jan 5) → Dec 31,
    //   W52 (Dec 23–29) → Dec 29, W51 (Dec 16–22) → Dec 22, W50 (Dec 9–15) → Dec 15
    // monthly 6: Dec 31, Nov 30, Oct 31, Sep 30, Aug 31, Jul 31
    use reason::*;
    let expected: Vec<(NaiveDate, Vec<&str>)> = vec![
        (
            date(2024, 12, 31),
            vec![NEWEST_GOOD, LAST, DAILY, WEEKLY, MONTHLY],
        ),
        (date(2024, 12, 30), vec![LAST, DAILY]),
        (date(2024, 12, 29), vec![LAST, DAILY, WEEKLY]),
        (date(2024, 12, 28), vec![DAILY]),
        (date(2024, 12, 27), vec![DAILY]),
        (date(2024, 12, 26), vec![DAILY]),
        (date(2024, 12, 25), vec![DAILY]),
        (date(2024, 12, 22), vec![WEEKLY]),
        (date(2024, 12, 15), vec![WEEKLY]),
        (date(2024, 11, 30), vec![MONTHLY]),
        (date(2024, 10, 31), vec![MONTHLY]),
        (date(2024, 9, 30), vec![MONTHLY]),
        (date(2024, 8, 31), vec![MONTHLY]),
        (date(2024, 7, 31), vec![MONTHLY]),
    ];
    let expected: Vec<(i64, Vec<&str>)> = expected
        .into_iter()
        .map(|(day, why)| (id_on(&backups, day), why))
        .collect();
    assert_eq!(p.keep, expected);
    // Spot-check the id arithmetic independently: Dec 31 is day 366, Jul 31 day 213.
    assert_eq!(p.keep.first().map(|k| k.0), Some(366));
    assert_eq!(p.keep.last().map(|k| k.0), Some(213));

    // Everything else is deleted, newest first, and nothing is in both lists.
    assert_eq!(p.delete.len(), 366 - 14);
    let kept: HashSet<i64> = p.keep.iter().map(|k| k.0).collect();
    let deleted: Vec<i64> = (1..=366).rev().filter(|id| !kept.contains(id)).collect();
    assert_eq!(p.delete, deleted);
}

#[test]
fn the_last_five_attempts_failing_pauses_retention() {
    let mut backups: Vec<_> = year_of_daily_backups().into_iter().take(361).collect();
    // Dec 27 … Dec 31 failed.
    backups
        .extend((362..=366).map(|id| failed(id, utc(2024, 1, 1, 1, 0) + Days::new(id as u64 - 1))));
    let p = plan(&GFS, &backups, utc(2024, 12, 31, 12, 0), &Zone::Utc);

    assert_eq!(
        p.held_back.as_deref(),
        Some(
            "retention paused: the last 5 backups failed; every good backup is kept \
             until a new backup succeeds"
        )
    );
    assert!(p.delete.is_empty());
    assert_eq!(p.keep.len(), 361);
    // Failed attempts are in neither list.
    assert!((362..=366).all(|id| p.reasons(id).is_none()));
    // Kept backups still show their GFS reasons; the rest say why they survive.
    assert_eq!(
        p.reasons(361),
        Some(
            &[
                reason::NEWEST_GOOD,
                reason::LAST,
                reason::DAILY,
                reason::WEEKLY,
                reason::MONTHLY
            ][..]
        )
    );
    assert_eq!(p.reasons(1), Some(&[reason::PAUSED][..]));
}

#[test]
fn a_single_failure_pauses_retention_until_the_next_success() {
    let d = |day| utc(2024, 5, day, 1, 0);
    let policy = Policy {
        keep_last: 1,
        ..Policy::default()
    };
    let mut backups = vec![good(1, d(1)), good(2, d(2)), failed(3, d(3))];
    let p = plan(&policy, &backups, d(3), &Zone::Utc);
    assert_eq!(
        p.held_back.as_deref(),
        Some(
            "retention paused: the last backup failed; every good backup is kept until a new backup succeeds"
        )
    );
    assert!(p.delete.is_empty());

    backups.push(good(4, d(4)));
    let p = plan(&policy, &backups, d(4), &Zone::Utc);
    assert_eq!(p.held_back, None);
    assert_eq!(p.delete, vec![2, 1]);
    assert_eq!(p.keep, vec![(4, vec![reason::NEWEST_GOOD, reason::LAST])]);
}

#[test]
fn backups_that_stopped_running_pause_retention() {
    // No failed rows at all, but the newest good backup is three days old.
    let backups: Vec<_> = (1..=10)
        .map(|d| good(d, utc(2024, 5, d as u32, 1, 0)))
        .collect();
    let p = plan(
        &Policy {
            daily: 3,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 13, 9, 0),
        &Zone::Utc,
    );
    assert_eq!(
        p.held_back.as_deref(),
        Some(
            "retention paused: the newest good backup (2024-05-10 01:00 UTC) is from before \
             yesterday; backups may not be running; every good backup is kept until a new \
             backup succeeds"
        )
    );
    assert!(p.delete.is_empty());

    // Yesterday's backup is recent enough (today's may not have run yet).
    let p = plan(
        &Policy {
            daily: 3,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 11, 0, 30),
        &Zone::Utc,
    );
    assert_eq!(p.held_back, None);
    assert_eq!(p.delete, vec![7, 6, 5, 4, 3, 2, 1]);

    // A weekly policy only wants a backup from this or last ISO week.
    let p = plan(
        &Policy {
            weekly: 1,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 19, 9, 0),
        &Zone::Utc,
    );
    assert_eq!(
        p.held_back, None,
        "Sunday May 19 is in the week after May 10"
    );
    let p = plan(
        &Policy {
            weekly: 1,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 20, 9, 0),
        &Zone::Utc,
    );
    assert!(p.held_back.unwrap().contains("is from before last week"));

    // keep_last alone has no period, so only failures pause it.
    let p = plan(
        &Policy {
            keep_last: 2,
            ..Policy::default()
        },
        &backups,
        utc(2025, 1, 1, 0, 0),
        &Zone::Utc,
    );
    assert_eq!(p.held_back, None);
    assert_eq!(p.delete.len(), 8);
}

#[test]
fn no_good_backup_at_all_says_so_and_deletes_nothing() {
    let backups = vec![
        failed(1, utc(2024, 5, 1, 1, 0)),
        failed(2, utc(2024, 5, 2, 1, 0)),
    ];
    let p = plan(&GFS, &backups, utc(2024, 5, 2, 2, 0), &Zone::Utc);
    assert_eq!(
        p.held_back.as_deref(),
        Some("retention paused: none of the 2 backup attempts succeeded")
    );
    assert!(p.keep.is_empty() && p.delete.is_empty());
    let p = plan(&GFS, &backups[..1], utc(2024, 5, 2, 2, 0), &Zone::Utc);
    assert_eq!(
        p.held_back.as_deref(),
        Some("retention paused: the only backup attempt failed")
    );
    assert_eq!(
        plan(&GFS, &[], utc(2024, 5, 2, 2, 0), &Zone::Utc),
        Plan::default()
    );
}

#[test]
fn a_single_backup_is_never_deleted() {
    let only = [good(7, utc(2024, 5, 1, 1, 0))];
    for policy in [
        Policy {
            keep_last: 1,
            ..Policy::default()
        },
        Policy {
            monthly: 1,
            ..Policy::default()
        },
        GFS,
        Policy::default(),
    ] {
        for now in [utc(2024, 5, 1, 2, 0), utc(2026, 1, 1, 0, 0)] {
            let p = plan(&policy, &only, now, &Zone::Utc);
            assert!(p.delete.is_empty(), "{policy:?} at {now}");
            assert_eq!(p.keep.first().map(|k| k.0), Some(7));
            assert!(p.reasons(7).unwrap().contains(&reason::NEWEST_GOOD));
        }
    }
}

#[test]
fn the_newest_good_backup_survives_even_a_weekly_only_policy_on_a_busy_day() {
    // Several backups in one week: weekly keeps only the newest, which is also
    // the newest good one.
    let backups: Vec<_> = (0..4)
        .map(|h| good(h + 1, utc(2024, 5, 14, 6 * h as u32, 0)))
        .collect();
    let p = plan(
        &Policy {
            weekly: 1,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 14, 20, 0),
        &Zone::Utc,
    );
    assert_eq!(p.keep, vec![(4, vec![reason::NEWEST_GOOD, reason::WEEKLY])]);
    assert_eq!(p.delete, vec![3, 2, 1]);
}

#[test]
fn two_backups_on_the_same_day_keep_the_newer_one() {
    let backups = [
        good(1, utc(2024, 5, 1, 1, 0)),
        good(2, utc(2024, 5, 2, 1, 0)),
        good(3, utc(2024, 5, 2, 13, 0)),
    ];
    let p = plan(
        &Policy {
            daily: 2,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 2, 14, 0),
        &Zone::Utc,
    );
    assert_eq!(
        p.keep,
        vec![
            (3, vec![reason::NEWEST_GOOD, reason::DAILY]),
            (1, vec![reason::DAILY])
        ]
    );
    assert_eq!(p.delete, vec![2]);
}

#[test]
fn daily_counts_days_that_have_a_backup_not_calendar_days() {
    // Backups on May 1, 5 and 9 only: daily 2 keeps the two newest days with a
    // backup (9 and 5), not "May 8 and 9".
    let backups = [1, 5, 9].map(|d| good(d.into(), utc(2024, 5, d, 1, 0)));
    let p = plan(
        &Policy {
            daily: 2,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 9, 12, 0),
        &Zone::Utc,
    );
    assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![9, 5]);
    assert_eq!(p.delete, vec![1]);
}

#[test]
fn iso_weeks_start_on_monday() {
    // Sunday May 12 and Monday May 13 are in different ISO weeks (19 and 20).
    assert_eq!(date(2024, 5, 12).weekday(), Weekday::Sun);
    let backups = [
        good(1, utc(2024, 5, 11, 1, 0)),
        good(2, utc(2024, 5, 12, 1, 0)),
        good(3, utc(2024, 5, 13, 1, 0)),
    ];
    let p = plan(
        &Policy {
            weekly: 2,
            ..Policy::default()
        },
        &backups,
        utc(2024, 5, 13, 2, 0),
        &Zone::Utc,
    );
    assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!(p.delete, vec![1]);
}

#[test]
fn a_backup_at_23_30_utc_belongs_to_the_next_day_east_of_utc() {
    let backups = [
        good(1, utc(2024, 3, 9, 12, 0)),
        good(2, utc(2024, 3, 10, 12, 0)),
        good(3, utc(2024, 3, 10, 23, 30)), // 00:30 on March 11 at +01:00
    ];
    let policy = Policy {
        daily: 2,
        ..Policy::default()
    };
    let now = utc(2024, 3, 11, 8, 0);

    // In UTC, 2 and 3 share March 10: keep 3 and March 9's backup.
    let p = plan(&policy, &backups, now, &Zone::Utc);
    assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 1]);
    assert_eq!(p.delete, vec![2]);

    // At +01:00 (Berlin in winter), 3 is March 11 and 2 is the newest of March 10.
    let p = plan(&policy, &backups, now, &Zone::parse("+01:00").unwrap());
    assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!(p.delete, vec![1]);

    // Same with a zone that has DST: in summer Berlin is +02:00, so 22:30 UTC is
    // already the next day.
    let summer = [
        good(1, utc(2024, 7, 9, 12, 0)),
        good(2, utc(2024, 7, 10, 12, 0)),
        good(3, utc(2024, 7, 10, 22, 30)),
    ];
    let local = |t: DateTime<Utc>| t.with_timezone(&EuCentral).naive_local();
    let p = plan_with(
        &policy,
        &summer,
        utc(2024, 7, 11, 8, 0),
        local,
        "Europe/Berlin",
    );
    assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!(p.delete, vec![1]);
}

#[test]
fn months_are_counted_in_the_zone_too() {
    // 23:30 UTC on April 30 is May 1 at +02:00.
    let backups = [
        good(1, utc(2024, 4, 29, 12, 0)),
        good(2, utc(2024, 4, 30, 23, 30)),
    ];
    let policy = Policy {
        monthly: 2,
        ..Policy::default()
    };
    let now = utc(2024, 5, 1, 8, 0);
    assert_eq!(plan(&policy, &backups, now, &Zone::Utc).delete, vec![1]);
    let p = plan(&policy, &backups, now, &Zone::parse("+02:00").unwrap());
    assert!(p.delete.is_empty());
    assert_eq!(p.reasons(1), Some(&[reason::MONTHLY][..]));
}

#[test]
fn input_order_and_failed_rows_do_not_change_the_plan() {
    let mut backups = year_of_daily_backups();
    let expected = plan(&GFS, &backups, utc(2024, 12, 31, 12, 0), &Zone::Utc);
    backups.reverse();
    // An old failure, before the newest good backup, does not pause anything.
    backups.push(failed(1000, utc(2024, 6, 1, 2, 0)));
    assert_eq!(
        plan(&GFS, &backups, utc(2024, 12, 31, 12, 0), &Zone::Utc),
        expected
    );
}

#[test]
fn scheduler_ticks_across_dst_changes_run_exactly_the_listed_instants() {
    // What the page lists (next_n) is what a ticking scheduler runs (due_between),
    // on both DST change days, for fixed-time and wildcard jobs.
    for (start, end) in [
        (utc(2024, 3, 30, 22, 0), utc(2024, 3, 31, 4, 0)),
        (utc(2024, 10, 26, 22, 0), utc(2024, 10, 27, 4, 0)),
    ] {
        for expr in [
            "30 2 * * *",
            "0 2 * * *",
            "0 3 * * *",
            "30 * * * *",
            "*/20 1-3 * * *",
        ] {
            let c = cron(expr);
            let listed: Vec<_> = next_n_in(&c, &EuCentral, start, 200)
                .into_iter()
                .take_while(|t| *t <= end)
                .collect();
            let ticks: Vec<_> = std::iter::successors(Some(start), |t| {
                Some(*t + chrono::TimeDelta::seconds(170)).filter(|t| *t <= end)
            })
            .collect();
            let due: Vec<_> = ticks
                .windows(2)
                .filter_map(|w| due_between_in(&c, &EuCentral, w[0], w[1]))
                .collect();
            assert_eq!(due, listed, "{expr} from {start}");
            assert!(!listed.is_empty());
        }
    }
}

// --- Named zones (chrono-tz) -----------------------------------------------------

fn berlin(expr: &str) -> Schedule {
    Schedule::parse(expr, "Europe/Berlin").unwrap()
}

#[test]
fn named_zones_parse_and_show_their_name() {
    let s = berlin("0 2 * * *");
    assert_eq!(s.zone().to_string(), "Europe/Berlin");
    assert_eq!(s.to_string(), "0 2 * * * (Europe/Berlin)");
}

#[test]
fn berlin_follows_the_eu_rules_across_both_dst_changes() {
    for (start, end) in [
        (utc(2024, 3, 29, 0, 0), utc(2024, 4, 2, 0, 0)),
        (utc(2024, 10, 25, 0, 0), utc(2024, 10, 29, 0, 0)),
    ] {
        for expr in [
            "30 2 * * *",
            "0 2 * * *",
            "0 3 * * *",
            "30 * * * *",
            "*/20 1-3 * * *",
        ] {
            let s = berlin(expr);
            let named: Vec<_> = s
                .next_n(start, 500)
                .into_iter()
                .take_while(|t| *t <= end)
                .collect();
            let rules: Vec<_> = next_n_in(&cron(expr), &EuCentral, start, 500)
                .into_iter()
                .take_while(|t| *t <= end)
                .collect();
            assert_eq!(named, rules, "{expr}");
            for w in named.windows(2) {
                let mid = w[0] + (w[1] - w[0]) / 2;
                assert_eq!(s.due_between(w[0], mid), None, "{expr}");
                assert_eq!(s.due_between(mid, w[1]), Some(w[1]), "{expr}");
            }
        }
    }
}

#[test]
fn next_n_in_berlin_across_spring_forward() {
    assert_eq!(
        berlin("30 2 * * *").next_n(utc(2024, 3, 29, 12, 0), 3),
        vec![
            utc(2024, 3, 30, 1, 30),
            utc(2024, 3, 31, 1, 0),
            utc(2024, 4, 1, 0, 30)
        ]
    );
}

#[test]
fn a_backup_at_23_30_utc_is_tomorrow_in_berlin() {
    let zone = Zone::parse("Europe/Berlin").unwrap();
    let backups = [
        good(1, utc(2024, 3, 9, 12, 0)),
        good(2, utc(2024, 3, 10, 12, 0)),
        good(3, utc(2024, 3, 10, 23, 30)),
    ];
    let policy = Policy {
        daily: 2,
        ..Policy::default()
    };
    let p = plan(&policy, &backups, utc(2024, 3, 11, 8, 0), &zone);
    assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!(p.delete, vec![1]);
}
