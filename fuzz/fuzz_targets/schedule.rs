//! Cron and time-zone parsing (`Schedule::parse`, `Zone::parse`) on any text
//! (`expr|zone`): never a panic; a zone's printed name parses to the same zone; a
//! schedule's next runs are strictly later than the instant asked about and in
//! order, and a scheduler tick ending on the next run finds exactly that run due.
#![no_main]

use chrono::{DateTime, TimeDelta, Utc};
use dbops::fuzzing::{Schedule, Zone};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (expr, tz) = text.split_once('|').unwrap_or((text, "UTC"));
    if let Ok(zone) = Zone::parse(tz) {
        let again = Zone::parse(&zone.to_string())
            .unwrap_or_else(|e| panic!("{zone} does not parse again: {e}"));
        assert_eq!(again.to_string(), zone.to_string());
    }
    let Ok(schedule) = Schedule::parse(expr, tz) else {
        return;
    };
    let _ = schedule.to_string();
    let seconds = data.iter().fold(0i64, |a, b| (a * 31 + i64::from(*b)) % 4_000_000_000);
    for t in [
        DateTime::<Utc>::from_timestamp(1_711_846_800, 0).unwrap(), // 2024-03-31 01:00 UTC: DST starts in Europe
        DateTime::<Utc>::from_timestamp(seconds, 0).unwrap(),
    ] {
        let next = schedule.next_n(t, 3);
        assert!(next.first().is_none_or(|n| *n > t));
        assert!(next.windows(2).all(|w| w[0] < w[1]), "{schedule}: {next:?}");
        assert_eq!(schedule.next_after(t), next.first().copied());
        if let Some(n) = next.first() {
            assert_eq!(schedule.due_between(t, *n), Some(*n), "{schedule} at {t}");
            let before = *n - TimeDelta::seconds(1);
            if before > t {
                assert_eq!(schedule.due_between(t, before), None, "{schedule} at {t}");
            }
        }
    }
});
