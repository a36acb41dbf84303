//! Billing periods' arithmetic: where the period after a given one ends.
//!
//! Below every layer that needs it (the ledger, the domain, the settings),
//! and pure: no clock, no store. Periods count from the billing anchor, a
//! calendar month at a time, as Stripe's monthly prices do. A fixed length
//! in seconds (`BILLING_PERIOD_SECONDS`) is for simulations and demos, the
//! service's own test clock: with a Stripe whose periods are as short (the
//! billing simulation's stand-in), a run crosses dozens of periods in a
//! minute.

use chrono::{DateTime, Datelike, Months, Utc};

/// How long a billing period lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cadence {
    /// A calendar month from the anchor (the default).
    #[default]
    Monthly,
    /// A fixed number of seconds from the anchor.
    Seconds(i64),
}

impl Cadence {
    /// How many period ends the hot state knows ahead. The consume script
    /// starts each in turn without waiting for a rollover, so usage after
    /// a boundary always counts against its own period, however late the
    /// scheduler or Stripe's events are, for this long (every rollover
    /// renews the list): a year of months; twenty minutes of two-second
    /// periods.
    pub fn ends_ahead(self) -> usize {
        match self {
            Cadence::Monthly => 12,
            Cadence::Seconds(_) => 600,
        }
    }

    /// The end of the period that follows the one ending at `end`: the
    /// first `anchor + n periods` after `end`. Counting from the anchor
    /// keeps a monthly period that began on the 31st ending on the last
    /// day of short months and on the 31st again after them.
    /// The period that contains `now`, among those after the one ending at
    /// `end` (`now >= end`): its start and end, however many boundaries
    /// lie between.
    pub fn containing(
        self,
        anchor: DateTime<Utc>,
        end: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> (DateTime<Utc>, DateTime<Utc>) {
        let (mut start, mut end) = (end, self.after(anchor, end));
        while end <= now {
            (start, end) = (end, self.after(anchor, end));
        }
        (start, end)
    }

    pub fn after(self, anchor: DateTime<Utc>, end: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Cadence::Monthly => month_after(anchor, end),
            Cadence::Seconds(length) => {
                let length = length.max(1);
                let elapsed = (end - anchor).num_milliseconds().max(0);
                let n = elapsed / (length * 1000) + 1;
                anchor + chrono::Duration::seconds(n * length)
            }
        }
    }
}

fn month_after(anchor: DateTime<Utc>, end: DateTime<Utc>) -> DateTime<Utc> {
    // Whole calendar months from the anchor to `end`, less one: never past
    // the answer; the loop steps up to it.
    let months = (end.year() - anchor.year()) * 12 + end.month0() as i32 - anchor.month0() as i32;
    let mut n = (months - 1).max(0) as u32;
    loop {
        let candidate = anchor + Months::new(n);
        if candidate > end {
            return candidate;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_period_begun_on_the_31st_ends_on_each_months_last_day_without_drifting() {
        let anchor = at("2026-01-31T10:00:00Z");
        let feb = Cadence::Monthly.after(anchor, anchor);
        assert_eq!(feb, at("2026-02-28T10:00:00Z"));
        let mar = Cadence::Monthly.after(anchor, feb);
        assert_eq!(mar, at("2026-03-31T10:00:00Z"));
        assert_eq!(
            Cadence::Monthly.after(anchor, mar),
            at("2026-04-30T10:00:00Z")
        );
    }

    #[test]
    fn the_next_end_is_strictly_after_the_given_end() {
        let anchor = at("2026-03-15T00:00:00Z");
        assert_eq!(
            Cadence::Monthly.after(anchor, at("2026-05-15T00:00:00Z")),
            at("2026-06-15T00:00:00Z")
        );
        assert_eq!(
            Cadence::Monthly.after(anchor, at("2027-05-14T23:59:59Z")),
            at("2027-05-15T00:00:00Z")
        );
    }

    #[test]
    fn periods_of_fixed_seconds_count_from_the_anchor() {
        let anchor = at("2026-03-15T00:00:00Z");
        let every = Cadence::Seconds(3);
        assert_eq!(every.after(anchor, anchor), at("2026-03-15T00:00:03Z"));
        assert_eq!(
            every.after(anchor, at("2026-03-15T00:00:03Z")),
            at("2026-03-15T00:00:06Z")
        );
        assert_eq!(
            every.after(anchor, at("2026-03-15T00:00:04.5Z")),
            at("2026-03-15T00:00:06Z"),
            "an end between two boundaries moves to the next"
        );
    }
}
