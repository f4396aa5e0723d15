//! Budget: a spending limit per period (or none, for tracking only), the spends recorded
//! against it and the reservations (holds) that set money aside until captured, released
//! or expired. Checking the limit and recording the spend are one decision.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Duration, NaiveTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::{Limit, Money, PositiveAmount};

/// A budget's name: trimmed, 1..=200 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BudgetName(String);

impl BudgetName {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(raw: &str) -> Result<Self, BudgetError> {
        clean_text("name", raw, Self::MAX_CHARS).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BudgetName {
    type Error = BudgetError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<BudgetName> for String {
    fn from(value: BudgetName) -> Self {
        value.0
    }
}

fn clean_text(field: &'static str, raw: &str, max: usize) -> Result<String, BudgetError> {
    crate::text::clean(raw, max).map_err(|reason| BudgetError::InvalidField { field, reason })
}

/// The span a limit applies to. Periods are UTC calendar days or months.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// The limit applies to all spending, for ever.
    #[default]
    None,
    Daily,
    Monthly,
}

impl BudgetPeriod {
    pub fn parse(text: &str) -> Option<Self> {
        [Self::None, Self::Daily, Self::Monthly]
            .into_iter()
            .find(|p| p.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Daily => "daily",
            Self::Monthly => "monthly",
        }
    }

    /// The start of the period holding `at`; `None` when the budget has no periods.
    pub fn start_of(self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let day = at.date_naive();
        let first = match self {
            Self::None => return None,
            Self::Daily => day,
            Self::Monthly => day.with_day(1).expect("every month has a first day"),
        };
        Some(first.and_time(NaiveTime::MIN).and_utc())
    }
}

impl std::fmt::Display for BudgetPeriod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpendCategory {
    Enrichment,
    Ai,
    Outreach,
    Other,
}

impl SpendCategory {
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Enrichment, Self::Ai, Self::Outreach, Self::Other]
            .into_iter()
            .find(|c| c.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enrichment => "enrichment",
            Self::Ai => "ai",
            Self::Outreach => "outreach",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for SpendCategory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far past its limit a budget may go, in whole percent, 0..=100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct GracePercent(u8);

impl GracePercent {
    pub const MAX: u8 = 100;

    pub fn new(percent: u8) -> Result<Self, BudgetError> {
        if percent > Self::MAX {
            return Err(BudgetError::InvalidField {
                field: "grace_percent",
                reason: format!("must be from 0 to {}", Self::MAX),
            });
        }
        Ok(Self(percent))
    }

    pub fn value(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for GracePercent {
    type Error = BudgetError;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<GracePercent> for u8 {
    fn from(value: GracePercent) -> Self {
        value.0
    }
}

/// The longest a hold may last (the API's `ttl_seconds` maximum).
pub const MAX_HOLD: Duration = Duration::seconds(86_400);
/// How long a settled hold is remembered after it would have expired, so that a late
/// capture or release gets its idempotent answer; after that it is forgotten and the
/// budget's state stops growing with every hold ever made.
pub const SETTLED_RETENTION: Duration = Duration::days(7);
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
pub const MAX_MODEL_CHARS: usize = 200;
pub const MAX_TOKENS: u64 = 1_000_000_000_000;
/// The shares of the limit whose crossing is announced, once per period each.
pub const THRESHOLDS: [u8; 2] = [80, 100];

/// Money set aside until captured, released or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub amount: PositiveAmount,
    pub category: SpendCategory,
    pub expires_at: DateTime<Utc>,
    pub reserved_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationOutcome {
    Captured { amount: PositiveAmount },
    Released,
    Expired,
}

/// A hold that no longer holds money, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettledReservation {
    pub outcome: ReservationOutcome,
    pub expires_at: DateTime<Utc>,
}

/// What a budget can be asked to do. Times come from the caller: the aggregate has no clock.
/// Before any command but `Create` is decided, every hold whose `expires_at` is at or before
/// the command's time is expired (with a `ReservationExpired` event each).
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetCommand {
    Create {
        name: BudgetName,
        /// `None`: tracking only.
        limit: Option<Limit>,
        period: BudgetPeriod,
        grace_percent: GracePercent,
        at: DateTime<Utc>,
    },
    Spend {
        /// Chosen by the caller, so the response can name the spend.
        spend_id: Uuid,
        amount: PositiveAmount,
        category: SpendCategory,
        description: Option<String>,
        model: Option<String>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
        at: DateTime<Utc>,
    },
    Reserve {
        reservation_id: Uuid,
        amount: PositiveAmount,
        category: SpendCategory,
        expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// Spend up to the held amount; the rest of the hold is freed.
    Capture {
        reservation_id: Uuid,
        amount: PositiveAmount,
        at: DateTime<Utc>,
    },
    Release {
        reservation_id: Uuid,
        at: DateTime<Utc>,
    },
    /// Only the expiry every command starts with, for a background worker.
    ExpireReservations { at: DateTime<Utc> },
    SetLimit {
        limit: Option<Limit>,
        at: DateTime<Utc>,
    },
}

impl BudgetCommand {
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::Create { at, .. }
            | Self::Spend { at, .. }
            | Self::Reserve { at, .. }
            | Self::Capture { at, .. }
            | Self::Release { at, .. }
            | Self::ExpireReservations { at }
            | Self::SetLimit { at, .. } => *at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BudgetEvent {
    BudgetCreated {
        name: BudgetName,
        limit: Option<Limit>,
        period: BudgetPeriod,
        grace_percent: GracePercent,
        created_at: DateTime<Utc>,
    },
    /// `period_start` is the period the spend counts in, decided from `spent_at` when the
    /// spend was accepted, so replay puts it in the same period.
    SpendRecorded {
        spend_id: Uuid,
        amount: PositiveAmount,
        category: SpendCategory,
        description: Option<String>,
        model: Option<String>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
        period_start: Option<DateTime<Utc>>,
        spent_at: DateTime<Utc>,
    },
    ReservationMade {
        reservation_id: Uuid,
        amount: PositiveAmount,
        category: SpendCategory,
        expires_at: DateTime<Utc>,
        reserved_at: DateTime<Utc>,
    },
    /// `amount` is spent in `period_start`'s period; all of `held` stops being reserved.
    ReservationCaptured {
        reservation_id: Uuid,
        amount: PositiveAmount,
        held: PositiveAmount,
        category: SpendCategory,
        period_start: Option<DateTime<Utc>>,
        captured_at: DateTime<Utc>,
    },
    ReservationReleased {
        reservation_id: Uuid,
        amount: PositiveAmount,
        released_at: DateTime<Utc>,
    },
    /// `expired_at` is the hold's own `expires_at`, whenever the expiry was noticed.
    ReservationExpired {
        reservation_id: Uuid,
        amount: PositiveAmount,
        expired_at: DateTime<Utc>,
    },
    BudgetLimitSet {
        limit: Option<Limit>,
        set_at: DateTime<Utc>,
    },
    /// Spending in the period reached `percent` (80 or 100) of the limit.
    BudgetThresholdCrossed {
        percent: u8,
        period_start: Option<DateTime<Utc>>,
        spent: Money,
        limit: Limit,
        crossed_at: DateTime<Utc>,
    },
}

impl BudgetEvent {
    /// The time the event is about.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::BudgetCreated { created_at: t, .. }
            | Self::SpendRecorded { spent_at: t, .. }
            | Self::ReservationMade { reserved_at: t, .. }
            | Self::ReservationCaptured { captured_at: t, .. }
            | Self::ReservationReleased { released_at: t, .. }
            | Self::ReservationExpired { expired_at: t, .. }
            | Self::BudgetLimitSet { set_at: t, .. }
            | Self::BudgetThresholdCrossed { crossed_at: t, .. } => *t,
        }
    }
}

impl DomainEvent for BudgetEvent {
    fn event_type(&self) -> String {
        match self {
            Self::BudgetCreated { .. } => "BudgetCreated",
            Self::SpendRecorded { .. } => "SpendRecorded",
            Self::ReservationMade { .. } => "ReservationMade",
            Self::ReservationCaptured { .. } => "ReservationCaptured",
            Self::ReservationReleased { .. } => "ReservationReleased",
            Self::ReservationExpired { .. } => "ReservationExpired",
            Self::BudgetLimitSet { .. } => "BudgetLimitSet",
            Self::BudgetThresholdCrossed { .. } => "BudgetThresholdCrossed",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("{field} {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("budget does not exist")]
    NotFound,
    #[error("budget exists already")]
    AlreadyExists,
    /// `remaining` is the limit less spent and reserved (as shown on the budget);
    /// `available` is what may still be spent now, grace included.
    #[error("budget exceeded: {available} available")]
    BudgetExceeded { remaining: Money, available: Money },
    #[error("reservation does not exist")]
    ReservationNotFound,
    #[error("a reservation with this id exists already")]
    ReservationAlreadyExists,
    #[error("reservation was released")]
    ReservationReleased,
    #[error("reservation has expired")]
    ReservationExpired,
    #[error("capture exceeds the {held} held")]
    CaptureExceedsHold { held: Money },
    #[error("amount out of range")]
    AmountOverflow,
}

/// The budget's state, rebuilt from its events (and kept in snapshots).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub created: bool,
    pub name: String,
    pub limit: Option<Limit>,
    pub period: BudgetPeriod,
    pub grace_percent: GracePercent,
    /// The period of the latest spend; `spent_in_period` belongs to it.
    pub period_start: Option<DateTime<Utc>>,
    pub spent_in_period: Money,
    pub spent_total: Money,
    /// Thresholds already announced in `period_start`'s period.
    pub thresholds_crossed: BTreeSet<u8>,
    pub holds: BTreeMap<Uuid, Reservation>,
    pub settled: BTreeMap<Uuid, SettledReservation>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Money figures shown to people round down to Money's precision: grace can add digits,
/// and a figure of what may be spent must never overstate it.
fn money_floor(value: Decimal) -> Money {
    let floored = value.round_dp_with_strategy(
        Money::MAX_FRACTION_DIGITS,
        RoundingStrategy::ToNegativeInfinity,
    );
    // In range: every operand is a bounded Money or Limit.
    Money::from_decimal(floored.max(Decimal::ZERO)).unwrap_or(Money::ZERO)
}

impl Budget {
    fn require_created(&self) -> Result<(), BudgetError> {
        if self.created {
            Ok(())
        } else {
            Err(BudgetError::NotFound)
        }
    }

    /// The period a spend at `at` counts in. Never one before the latest spend's: a
    /// writer whose clock runs slightly behind must not reopen a closed period.
    pub fn period_start_for(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match (self.period.start_of(at), self.period_start) {
            (Some(start), Some(latest)) => Some(start.max(latest)),
            (start, _) => start,
        }
    }

    fn spent_in(&self, period_start: Option<DateTime<Utc>>) -> Money {
        if period_start == self.period_start {
            self.spent_in_period
        } else {
            Money::ZERO
        }
    }

    /// Spent in the period holding `now` (zero when nothing was spent in it yet).
    pub fn spent_at(&self, now: DateTime<Utc>) -> Money {
        self.spent_in(self.period_start_for(now))
    }

    /// Held by every hold not yet settled, expired ones included until their expiry is
    /// recorded.
    pub fn reserved(&self) -> Money {
        self.holds
            .values()
            .map(|h| h.amount.money())
            .fold(Money::ZERO, |sum, a| sum.checked_add(a).unwrap_or(sum))
    }

    /// Held at `now`: holds past their expiry hold nothing, recorded or not.
    pub fn reserved_at(&self, now: DateTime<Utc>) -> Money {
        self.holds
            .values()
            .filter(|h| h.expires_at > now)
            .map(|h| h.amount.money())
            .fold(Money::ZERO, |sum, a| sum.checked_add(a).unwrap_or(sum))
    }

    /// The limit less spent and reserved at `now`, never below zero; `None` when tracking only.
    pub fn remaining_at(&self, now: DateTime<Utc>) -> Option<Money> {
        let limit = self.limit?.money().as_decimal();
        let used = self.spent_at(now).as_decimal() + self.reserved_at(now).as_decimal();
        Some(money_floor(limit - used))
    }

    /// What may still be spent at `now`, grace included; `None` when tracking only.
    pub fn available_at(&self, now: DateTime<Utc>) -> Option<Money> {
        let allowance = self.allowance()?;
        let used = self.spent_at(now).as_decimal() + self.reserved_at(now).as_decimal();
        Some(money_floor(allowance - used))
    }

    /// limit × (1 + grace/100), exact.
    fn allowance(&self) -> Option<Decimal> {
        let limit = self.limit?.money().as_decimal();
        Some(
            limit * Decimal::from(100 + u32::from(self.grace_percent.value()))
                / Decimal::ONE_HUNDRED,
        )
    }

    /// Refuses `amount` on top of `spent` and what is reserved when it would pass the
    /// allowance. Called after expired holds were recorded, so they no longer count.
    fn check_fits(&self, spent: Money, amount: PositiveAmount) -> Result<(), BudgetError> {
        let (Some(limit), Some(allowance)) = (self.limit, self.allowance()) else {
            return Ok(());
        };
        let used = spent.as_decimal() + self.reserved().as_decimal();
        if used + amount.money().as_decimal() > allowance {
            return Err(BudgetError::BudgetExceeded {
                remaining: money_floor(limit.money().as_decimal() - used),
                available: money_floor(allowance - used),
            });
        }
        Ok(())
    }

    fn expiry_events(&self, at: DateTime<Utc>) -> Vec<BudgetEvent> {
        let mut expired: Vec<_> = self
            .holds
            .iter()
            .filter(|(_, h)| h.expires_at <= at)
            .collect();
        expired.sort_by_key(|(id, h)| (h.expires_at, **id));
        expired
            .into_iter()
            .map(|(id, h)| BudgetEvent::ReservationExpired {
                reservation_id: *id,
                amount: h.amount,
                expired_at: h.expires_at,
            })
            .collect()
    }

    /// The thresholds the period's spending has reached and that were not announced yet.
    fn threshold_events(&self, at: DateTime<Utc>) -> Vec<BudgetEvent> {
        let Some(limit) = self.limit else {
            return Vec::new();
        };
        let period_start = self.period_start_for(at);
        let spent = self.spent_in(period_start);
        if spent.is_zero() {
            return Vec::new();
        }
        THRESHOLDS
            .into_iter()
            .filter(|percent| {
                let reached = spent.as_decimal() * Decimal::ONE_HUNDRED
                    >= limit.money().as_decimal() * Decimal::from(*percent);
                let announced =
                    period_start == self.period_start && self.thresholds_crossed.contains(percent);
                reached && !announced
            })
            .map(|percent| BudgetEvent::BudgetThresholdCrossed {
                percent,
                period_start,
                spent,
                limit,
                crossed_at: at,
            })
            .collect()
    }

    /// Moves the state to the period of an event, starting it from zero if it is new.
    fn enter_period(&mut self, period_start: Option<DateTime<Utc>>) {
        if period_start != self.period_start {
            self.period_start = period_start;
            self.spent_in_period = Money::ZERO;
            self.thresholds_crossed.clear();
        }
    }

    fn add_spend(&mut self, amount: PositiveAmount) {
        let amount = amount.money();
        // `handle` refused any spend whose sums leave Money's range.
        self.spent_in_period = self
            .spent_in_period
            .checked_add(amount)
            .expect("handle checked the period's sum");
        self.spent_total = self
            .spent_total
            .checked_add(amount)
            .expect("handle checked the total");
    }

    fn check_sums(
        &self,
        period_start: Option<DateTime<Utc>>,
        amount: PositiveAmount,
    ) -> Result<(), BudgetError> {
        let in_period = self.spent_in(period_start).checked_add(amount.money());
        let total = self.spent_total.checked_add(amount.money());
        match (in_period, total) {
            (Some(_), Some(_)) => Ok(()),
            _ => Err(BudgetError::AmountOverflow),
        }
    }

    fn settle(&mut self, reservation_id: Uuid, outcome: ReservationOutcome) {
        if let Some(hold) = self.holds.remove(&reservation_id) {
            self.settled.insert(
                reservation_id,
                SettledReservation {
                    outcome,
                    expires_at: hold.expires_at,
                },
            );
        }
    }
}

fn optional_text(
    field: &'static str,
    raw: Option<String>,
    max: usize,
) -> Result<Option<String>, BudgetError> {
    raw.map(|text| clean_text(field, &text, max)).transpose()
}

fn check_tokens(field: &'static str, tokens: Option<u64>) -> Result<(), BudgetError> {
    match tokens {
        Some(n) if n > MAX_TOKENS => Err(BudgetError::InvalidField {
            field,
            reason: format!("must be at most {MAX_TOKENS}"),
        }),
        _ => Ok(()),
    }
}

impl Aggregate for Budget {
    const TYPE: &'static str = "budget";
    type Command = BudgetCommand;
    type Event = BudgetEvent;
    type Error = BudgetError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let at = command.at();
        if let BudgetCommand::Create {
            name,
            limit,
            period,
            grace_percent,
            at,
        } = command
        {
            if self.created {
                return Err(BudgetError::AlreadyExists);
            }
            let event = BudgetEvent::BudgetCreated {
                name,
                limit,
                period,
                grace_percent,
                created_at: at,
            };
            sink.write(event, self).await;
            return Ok(());
        }
        self.require_created()?;

        // Expired holds free their money before anything is decided. `write` applies each
        // event, so what follows decides on the state without them.
        for event in self.expiry_events(at) {
            sink.write(event, self).await;
        }

        let mut events = Vec::new();
        match command {
            BudgetCommand::Create { .. } => unreachable!("handled above"),
            BudgetCommand::Spend {
                spend_id,
                amount,
                category,
                description,
                model,
                input_tokens,
                output_tokens,
                at,
            } => {
                let description = optional_text("description", description, MAX_DESCRIPTION_CHARS)?;
                let model = optional_text("model", model, MAX_MODEL_CHARS)?;
                check_tokens("input_tokens", input_tokens)?;
                check_tokens("output_tokens", output_tokens)?;
                let period_start = self.period_start_for(at);
                self.check_sums(period_start, amount)?;
                self.check_fits(self.spent_in(period_start), amount)?;
                events.push(BudgetEvent::SpendRecorded {
                    spend_id,
                    amount,
                    category,
                    description,
                    model,
                    input_tokens,
                    output_tokens,
                    period_start,
                    spent_at: at,
                });
            }
            BudgetCommand::Reserve {
                reservation_id,
                amount,
                category,
                expires_at,
                at,
            } => {
                if expires_at <= at || expires_at - at > MAX_HOLD {
                    return Err(BudgetError::InvalidField {
                        field: "expires_at",
                        reason: format!(
                            "must be after the reservation and at most {} seconds later",
                            MAX_HOLD.num_seconds()
                        ),
                    });
                }
                if self.holds.contains_key(&reservation_id)
                    || self.settled.contains_key(&reservation_id)
                {
                    return Err(BudgetError::ReservationAlreadyExists);
                }
                self.check_fits(self.spent_at(at), amount)?;
                events.push(BudgetEvent::ReservationMade {
                    reservation_id,
                    amount,
                    category,
                    expires_at,
                    reserved_at: at,
                });
            }
            BudgetCommand::Capture {
                reservation_id,
                amount,
                at,
            } => match (
                self.holds.get(&reservation_id),
                self.settled.get(&reservation_id),
            ) {
                (Some(hold), _) => {
                    if amount > hold.amount {
                        return Err(BudgetError::CaptureExceedsHold {
                            held: hold.amount.money(),
                        });
                    }
                    let period_start = self.period_start_for(at);
                    self.check_sums(period_start, amount)?;
                    // No limit check: the money was set aside when the hold was made.
                    events.push(BudgetEvent::ReservationCaptured {
                        reservation_id,
                        amount,
                        held: hold.amount,
                        category: hold.category,
                        period_start,
                        captured_at: at,
                    });
                }
                (None, Some(settled)) => match settled.outcome {
                    ReservationOutcome::Captured { .. } => {}
                    ReservationOutcome::Released => return Err(BudgetError::ReservationReleased),
                    ReservationOutcome::Expired => return Err(BudgetError::ReservationExpired),
                },
                (None, None) => return Err(BudgetError::ReservationNotFound),
            },
            BudgetCommand::Release { reservation_id, at } => {
                match (
                    self.holds.get(&reservation_id),
                    self.settled.contains_key(&reservation_id),
                ) {
                    (Some(hold), _) => events.push(BudgetEvent::ReservationReleased {
                        reservation_id,
                        amount: hold.amount,
                        released_at: at,
                    }),
                    // Released, captured or expired: nothing is held any more, which is
                    // what a release asks for.
                    (None, true) => {}
                    (None, false) => return Err(BudgetError::ReservationNotFound),
                }
            }
            BudgetCommand::ExpireReservations { .. } => {}
            BudgetCommand::SetLimit { limit, at } => {
                if limit != self.limit {
                    events.push(BudgetEvent::BudgetLimitSet { limit, set_at: at });
                }
            }
        }
        let changed_spending = !events.is_empty();
        for event in events {
            sink.write(event, self).await;
        }
        if changed_spending {
            for event in self.threshold_events(at) {
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        let now = event.at();
        // Forget settled holds long past their expiry (see SETTLED_RETENTION). Decided by
        // the event's own time, so every replay forgets the same ones.
        self.settled
            .retain(|_, s| s.expires_at + SETTLED_RETENTION > now);
        // An expiry is dated at the hold's own expiry, which may precede earlier events.
        self.updated_at = self.updated_at.max(Some(now));
        match event {
            BudgetEvent::BudgetCreated {
                name,
                limit,
                period,
                grace_percent,
                created_at,
            } => {
                self.created = true;
                self.name = name.into();
                self.limit = limit;
                self.period = period;
                self.grace_percent = grace_percent;
                self.created_at = Some(created_at);
            }
            BudgetEvent::SpendRecorded {
                amount,
                period_start,
                ..
            } => {
                self.enter_period(period_start);
                self.add_spend(amount);
            }
            BudgetEvent::ReservationMade {
                reservation_id,
                amount,
                category,
                expires_at,
                reserved_at,
            } => {
                self.holds.insert(
                    reservation_id,
                    Reservation {
                        amount,
                        category,
                        expires_at,
                        reserved_at,
                    },
                );
            }
            BudgetEvent::ReservationCaptured {
                reservation_id,
                amount,
                period_start,
                ..
            } => {
                self.settle(reservation_id, ReservationOutcome::Captured { amount });
                self.enter_period(period_start);
                self.add_spend(amount);
            }
            BudgetEvent::ReservationReleased { reservation_id, .. } => {
                self.settle(reservation_id, ReservationOutcome::Released);
            }
            BudgetEvent::ReservationExpired { reservation_id, .. } => {
                self.settle(reservation_id, ReservationOutcome::Expired);
            }
            BudgetEvent::BudgetLimitSet { limit, .. } => {
                self.limit = limit;
            }
            BudgetEvent::BudgetThresholdCrossed {
                percent,
                period_start,
                ..
            } => {
                self.enter_period(period_start);
                self.thresholds_crossed.insert(percent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;
    use proptest::prelude::*;

    type Given = TestFramework<Budget>;

    fn time(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().into()
    }

    fn t0() -> DateTime<Utc> {
        time("2026-11-10T09:00:00Z")
    }

    fn mins(n: i64) -> DateTime<Utc> {
        t0() + Duration::minutes(n)
    }

    fn amount(text: &str) -> PositiveAmount {
        PositiveAmount::parse_str(text).unwrap()
    }

    fn money(text: &str) -> Money {
        Money::parse_str(text).unwrap()
    }

    fn limit(text: &str) -> Limit {
        Limit::parse_str(text).unwrap()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn day(date: &str) -> Option<DateTime<Utc>> {
        Some(time(&format!("{date}T00:00:00Z")))
    }

    fn created(limit_text: Option<&str>, period: BudgetPeriod, grace: u8) -> BudgetEvent {
        BudgetEvent::BudgetCreated {
            name: BudgetName::parse("AI spend").unwrap(),
            limit: limit_text.map(limit),
            period,
            grace_percent: GracePercent::new(grace).unwrap(),
            created_at: t0(),
        }
    }

    fn hundred() -> BudgetEvent {
        created(Some("100"), BudgetPeriod::None, 0)
    }

    fn spend(n: u128, amount_text: &str, at: DateTime<Utc>) -> BudgetCommand {
        BudgetCommand::Spend {
            spend_id: id(n),
            amount: amount(amount_text),
            category: SpendCategory::Ai,
            description: None,
            model: None,
            input_tokens: None,
            output_tokens: None,
            at,
        }
    }

    fn spent(
        n: u128,
        amount_text: &str,
        period_start: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> BudgetEvent {
        BudgetEvent::SpendRecorded {
            spend_id: id(n),
            amount: amount(amount_text),
            category: SpendCategory::Ai,
            description: None,
            model: None,
            input_tokens: None,
            output_tokens: None,
            period_start,
            spent_at: at,
        }
    }

    fn crossed(
        percent: u8,
        spent_text: &str,
        limit_text: &str,
        period_start: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> BudgetEvent {
        BudgetEvent::BudgetThresholdCrossed {
            percent,
            period_start,
            spent: money(spent_text),
            limit: limit(limit_text),
            crossed_at: at,
        }
    }

    fn reserve(
        n: u128,
        amount_text: &str,
        expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> BudgetCommand {
        BudgetCommand::Reserve {
            reservation_id: id(n),
            amount: amount(amount_text),
            category: SpendCategory::Enrichment,
            expires_at,
            at,
        }
    }

    fn reserved(
        n: u128,
        amount_text: &str,
        expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> BudgetEvent {
        BudgetEvent::ReservationMade {
            reservation_id: id(n),
            amount: amount(amount_text),
            category: SpendCategory::Enrichment,
            expires_at,
            reserved_at: at,
        }
    }

    fn state_after(events: &[BudgetEvent]) -> Budget {
        let mut budget = Budget::default();
        for event in events {
            budget.apply(event.clone());
        }
        budget
    }

    #[test]
    fn creating_a_budget_records_its_limit_period_and_grace() {
        Given::with(())
            .given_no_previous_events()
            .when(BudgetCommand::Create {
                name: BudgetName::parse("AI spend").unwrap(),
                limit: Some(limit("100")),
                period: BudgetPeriod::None,
                grace_percent: GracePercent::default(),
                at: t0(),
            })
            .then_expect_events(vec![hundred()]);
    }

    #[test]
    fn creating_a_budget_twice_is_refused() {
        Given::with(())
            .given(vec![hundred()])
            .when(BudgetCommand::Create {
                name: BudgetName::parse("again").unwrap(),
                limit: None,
                period: BudgetPeriod::Daily,
                grace_percent: GracePercent::default(),
                at: t0(),
            })
            .then_expect_error(BudgetError::AlreadyExists);
    }

    #[test]
    fn a_command_on_a_budget_that_does_not_exist_is_not_found() {
        Given::with(())
            .given_no_previous_events()
            .when(spend(1, "1", t0()))
            .then_expect_error(BudgetError::NotFound);
        Given::with(())
            .given_no_previous_events()
            .when(BudgetCommand::ExpireReservations { at: t0() })
            .then_expect_error(BudgetError::NotFound);
    }

    #[test]
    fn a_spend_within_the_limit_is_recorded() {
        Given::with(())
            .given(vec![hundred()])
            .when(spend(1, "12.34", mins(1)))
            .then_expect_events(vec![spent(1, "12.34", None, mins(1))]);
    }

    #[test]
    fn a_spend_that_would_pass_the_limit_is_refused_and_says_what_remains() {
        Given::with(())
            .given(vec![hundred(), spent(1, "70", None, mins(1))])
            .when(spend(2, "30.000001", mins(2)))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: money("30"),
                available: money("30"),
            });
    }

    #[test]
    fn a_spend_up_to_exactly_the_limit_is_allowed_and_announces_both_thresholds() {
        Given::with(())
            .given(vec![hundred(), spent(1, "70", None, mins(1))])
            .when(spend(2, "30", mins(2)))
            .then_expect_events(vec![
                spent(2, "30", None, mins(2)),
                crossed(80, "100", "100", None, mins(2)),
                crossed(100, "100", "100", None, mins(2)),
            ]);
    }

    #[test]
    fn each_threshold_is_announced_once_per_period() {
        Given::with(())
            .given(vec![
                hundred(),
                spent(1, "80", None, mins(1)),
                crossed(80, "80", "100", None, mins(1)),
            ])
            .when(spend(2, "5", mins(2)))
            .then_expect_events(vec![spent(2, "5", None, mins(2))]);
    }

    #[test]
    fn grace_lets_spending_pass_the_limit_by_its_percentage_and_no_further() {
        let given = vec![
            created(Some("100"), BudgetPeriod::None, 10),
            spent(1, "100", None, mins(1)),
            crossed(80, "100", "100", None, mins(1)),
            crossed(100, "100", "100", None, mins(1)),
        ];
        Given::with(())
            .given(given.clone())
            .when(spend(2, "10", mins(2)))
            .then_expect_events(vec![spent(2, "10", None, mins(2))]);
        Given::with(())
            .given(given)
            .when(spend(2, "10.000001", mins(2)))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: Money::ZERO,
                available: money("10"),
            });
    }

    #[test]
    fn a_tracking_only_budget_takes_any_spend_and_announces_no_threshold() {
        Given::with(())
            .given(vec![
                created(None, BudgetPeriod::Daily, 0),
                spent(1, "1000000", day("2026-11-10"), mins(1)),
            ])
            .when(spend(2, "1000000", mins(2)))
            .then_expect_events(vec![spent(2, "1000000", day("2026-11-10"), mins(2))]);
    }

    #[test]
    fn a_zero_limit_allows_no_spend() {
        Given::with(())
            .given(vec![created(Some("0"), BudgetPeriod::None, 50)])
            .when(spend(1, "0.000001", mins(1)))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: Money::ZERO,
                available: Money::ZERO,
            });
    }

    #[test]
    fn a_daily_budget_starts_each_utc_day_from_zero() {
        let late = time("2026-11-10T23:59:59Z");
        let next = time("2026-11-11T00:00:00Z");
        let given = vec![
            created(Some("100"), BudgetPeriod::Daily, 0),
            spent(1, "90", day("2026-11-10"), late),
            crossed(80, "90", "100", day("2026-11-10"), late),
        ];
        Given::with(())
            .given(given.clone())
            .when(spend(2, "20", late))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: money("10"),
                available: money("10"),
            });
        Given::with(())
            .given(given.clone())
            .when(spend(2, "85", next))
            .then_expect_events(vec![
                spent(2, "85", day("2026-11-11"), next),
                crossed(80, "85", "100", day("2026-11-11"), next),
            ]);
        let budget = state_after(&given);
        assert_eq!(budget.spent_at(late), money("90"));
        assert_eq!(budget.spent_at(next), Money::ZERO);
        assert_eq!(budget.remaining_at(next), Some(money("100")));
    }

    #[test]
    fn a_monthly_budget_counts_from_the_first_of_the_utc_month() {
        let given = vec![
            created(Some("100"), BudgetPeriod::Monthly, 0),
            spent(1, "60", day("2026-11-01"), time("2026-11-02T10:00:00Z")),
        ];
        Given::with(())
            .given(given.clone())
            .when(spend(2, "50", time("2026-11-30T23:00:00Z")))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: money("40"),
                available: money("40"),
            });
        Given::with(())
            .given(given)
            .when(spend(2, "50", time("2026-12-01T00:00:01Z")))
            .then_expect_events(vec![spent(
                2,
                "50",
                day("2026-12-01"),
                time("2026-12-01T00:00:01Z"),
            )]);
        assert_eq!(
            BudgetPeriod::Monthly.start_of(time("2028-02-29T13:14:15Z")),
            day("2028-02-01")
        );
    }

    #[test]
    fn a_spend_timed_before_the_latest_period_counts_in_the_latest_period() {
        // A writer whose clock lags must not reopen yesterday and forget today's spend.
        let given = vec![
            created(Some("100"), BudgetPeriod::Daily, 0),
            spent(1, "90", day("2026-11-11"), time("2026-11-11T00:00:01Z")),
        ];
        Given::with(())
            .given(given)
            .when(spend(2, "20", time("2026-11-10T23:59:59Z")))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: money("10"),
                available: money("10"),
            });
    }

    #[test]
    fn spend_details_are_validated_and_kept() {
        let command = |description: &str, tokens: u64| BudgetCommand::Spend {
            spend_id: id(1),
            amount: amount("1"),
            category: SpendCategory::Ai,
            description: Some(description.into()),
            model: Some("gpt-x".into()),
            input_tokens: Some(tokens),
            output_tokens: Some(3),
            at: mins(1),
        };
        Given::with(())
            .given(vec![hundred()])
            .when(command(" summary ", 1200))
            .then_expect_events(vec![BudgetEvent::SpendRecorded {
                spend_id: id(1),
                amount: amount("1"),
                category: SpendCategory::Ai,
                description: Some("summary".into()),
                model: Some("gpt-x".into()),
                input_tokens: Some(1200),
                output_tokens: Some(3),
                period_start: None,
                spent_at: mins(1),
            }]);
        Given::with(())
            .given(vec![hundred()])
            .when(command(&"x".repeat(1001), 1))
            .then_expect_error(BudgetError::InvalidField {
                field: "description",
                reason: "must be at most 1000 characters".into(),
            });
        Given::with(())
            .given(vec![hundred()])
            .when(command("ok", MAX_TOKENS + 1))
            .then_expect_error(BudgetError::InvalidField {
                field: "input_tokens",
                reason: format!("must be at most {MAX_TOKENS}"),
            });
    }

    #[test]
    fn a_reservation_holds_money_that_spends_cannot_use() {
        let given = vec![hundred(), reserved(7, "60", mins(60), mins(1))];
        Given::with(())
            .given(given.clone())
            .when(spend(1, "50", mins(2)))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: money("40"),
                available: money("40"),
            });
        Given::with(())
            .given(given.clone())
            .when(reserve(8, "40.5", mins(60), mins(2)))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: money("40"),
                available: money("40"),
            });
        let budget = state_after(&given);
        assert_eq!(budget.reserved_at(mins(2)), money("60"));
        assert_eq!(budget.remaining_at(mins(2)), Some(money("40")));
    }

    #[test]
    fn reserving_records_the_hold() {
        Given::with(())
            .given(vec![hundred()])
            .when(reserve(7, "60", mins(61), mins(1)))
            .then_expect_events(vec![reserved(7, "60", mins(61), mins(1))]);
    }

    #[test]
    fn a_reservation_must_expire_after_it_is_made_and_within_a_day() {
        for expires_at in [mins(1), mins(0), mins(1) + MAX_HOLD + Duration::seconds(1)] {
            let result = Given::with(())
                .given(vec![hundred()])
                .when(reserve(7, "1", expires_at, mins(1)))
                .inspect_result();
            assert!(
                matches!(
                    result,
                    Err(BudgetError::InvalidField {
                        field: "expires_at",
                        ..
                    })
                ),
                "{expires_at}: {result:?}"
            );
        }
        Given::with(())
            .given(vec![hundred()])
            .when(reserve(7, "1", mins(1) + MAX_HOLD, mins(1)))
            .then_expect_events(vec![reserved(7, "1", mins(1) + MAX_HOLD, mins(1))]);
    }

    #[test]
    fn a_reservation_id_is_used_once() {
        Given::with(())
            .given(vec![hundred(), reserved(7, "1", mins(60), mins(1))])
            .when(reserve(7, "1", mins(60), mins(2)))
            .then_expect_error(BudgetError::ReservationAlreadyExists);
    }

    #[test]
    fn capturing_spends_up_to_the_held_amount_and_frees_the_rest() {
        let given = vec![hundred(), reserved(7, "60", mins(60), mins(1))];
        let captured = BudgetEvent::ReservationCaptured {
            reservation_id: id(7),
            amount: amount("45"),
            held: amount("60"),
            category: SpendCategory::Enrichment,
            period_start: None,
            captured_at: mins(5),
        };
        Given::with(())
            .given(given.clone())
            .when(BudgetCommand::Capture {
                reservation_id: id(7),
                amount: amount("45"),
                at: mins(5),
            })
            .then_expect_events(vec![captured.clone()]);
        Given::with(())
            .given(given.clone())
            .when(BudgetCommand::Capture {
                reservation_id: id(7),
                amount: amount("60.000001"),
                at: mins(5),
            })
            .then_expect_error(BudgetError::CaptureExceedsHold { held: money("60") });
        let mut after = given;
        after.push(captured);
        let budget = state_after(&after);
        assert_eq!(budget.spent_at(mins(5)), money("45"));
        assert_eq!(budget.reserved_at(mins(5)), Money::ZERO);
        assert_eq!(budget.remaining_at(mins(5)), Some(money("55")));
    }

    #[test]
    fn a_capture_that_reaches_a_threshold_announces_it() {
        Given::with(())
            .given(vec![hundred(), reserved(7, "90", mins(60), mins(1))])
            .when(BudgetCommand::Capture {
                reservation_id: id(7),
                amount: amount("85"),
                at: mins(5),
            })
            .then_expect_events(vec![
                BudgetEvent::ReservationCaptured {
                    reservation_id: id(7),
                    amount: amount("85"),
                    held: amount("90"),
                    category: SpendCategory::Enrichment,
                    period_start: None,
                    captured_at: mins(5),
                },
                crossed(80, "85", "100", None, mins(5)),
            ]);
    }

    #[test]
    fn capturing_or_releasing_twice_records_nothing_the_second_time() {
        let captured = vec![
            hundred(),
            reserved(7, "60", mins(60), mins(1)),
            BudgetEvent::ReservationCaptured {
                reservation_id: id(7),
                amount: amount("45"),
                held: amount("60"),
                category: SpendCategory::Enrichment,
                period_start: None,
                captured_at: mins(5),
            },
        ];
        Given::with(())
            .given(captured.clone())
            .when(BudgetCommand::Capture {
                reservation_id: id(7),
                amount: amount("45"),
                at: mins(6),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(captured)
            .when(BudgetCommand::Release {
                reservation_id: id(7),
                at: mins(6),
            })
            .then_expect_events(vec![]);
        let released = vec![
            hundred(),
            reserved(7, "60", mins(60), mins(1)),
            BudgetEvent::ReservationReleased {
                reservation_id: id(7),
                amount: amount("60"),
                released_at: mins(5),
            },
        ];
        Given::with(())
            .given(released.clone())
            .when(BudgetCommand::Release {
                reservation_id: id(7),
                at: mins(6),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(released)
            .when(BudgetCommand::Capture {
                reservation_id: id(7),
                amount: amount("1"),
                at: mins(6),
            })
            .then_expect_error(BudgetError::ReservationReleased);
    }

    #[test]
    fn releasing_frees_the_hold() {
        Given::with(())
            .given(vec![hundred(), reserved(7, "60", mins(60), mins(1))])
            .when(BudgetCommand::Release {
                reservation_id: id(7),
                at: mins(2),
            })
            .then_expect_events(vec![BudgetEvent::ReservationReleased {
                reservation_id: id(7),
                amount: amount("60"),
                released_at: mins(2),
            }]);
    }

    #[test]
    fn capturing_or_releasing_an_unknown_reservation_is_not_found() {
        Given::with(())
            .given(vec![hundred()])
            .when(BudgetCommand::Release {
                reservation_id: id(9),
                at: mins(2),
            })
            .then_expect_error(BudgetError::ReservationNotFound);
        Given::with(())
            .given(vec![hundred()])
            .when(BudgetCommand::Capture {
                reservation_id: id(9),
                amount: amount("1"),
                at: mins(2),
            })
            .then_expect_error(BudgetError::ReservationNotFound);
    }

    #[test]
    fn an_expired_hold_frees_its_money_before_the_next_spend_is_decided() {
        Given::with(())
            .given(vec![hundred(), reserved(7, "60", mins(30), mins(1))])
            .when(spend(1, "90", mins(30)))
            .then_expect_events(vec![
                BudgetEvent::ReservationExpired {
                    reservation_id: id(7),
                    amount: amount("60"),
                    expired_at: mins(30),
                },
                spent(1, "90", None, mins(30)),
                crossed(80, "90", "100", None, mins(30)),
            ]);
    }

    #[test]
    fn a_hold_is_not_expired_a_moment_before_its_time() {
        Given::with(())
            .given(vec![hundred(), reserved(7, "60", mins(30), mins(1))])
            .when(spend(1, "90", mins(30) - Duration::milliseconds(1)))
            .then_expect_error(BudgetError::BudgetExceeded {
                remaining: money("40"),
                available: money("40"),
            });
    }

    #[test]
    fn the_expiry_worker_expires_every_due_hold_in_order_and_nothing_else() {
        Given::with(())
            .given(vec![
                hundred(),
                reserved(3, "1", mins(20), mins(1)),
                reserved(1, "2", mins(10), mins(1)),
                reserved(2, "3", mins(90), mins(1)),
            ])
            .when(BudgetCommand::ExpireReservations { at: mins(20) })
            .then_expect_events(vec![
                BudgetEvent::ReservationExpired {
                    reservation_id: id(1),
                    amount: amount("2"),
                    expired_at: mins(10),
                },
                BudgetEvent::ReservationExpired {
                    reservation_id: id(3),
                    amount: amount("1"),
                    expired_at: mins(20),
                },
            ]);
        Given::with(())
            .given(vec![hundred(), reserved(2, "3", mins(90), mins(1))])
            .when(BudgetCommand::ExpireReservations { at: mins(20) })
            .then_expect_events(vec![]);
    }

    #[test]
    fn capturing_an_expired_hold_is_refused_and_releasing_it_is_a_no_op() {
        let given = vec![
            hundred(),
            reserved(7, "60", mins(30), mins(1)),
            BudgetEvent::ReservationExpired {
                reservation_id: id(7),
                amount: amount("60"),
                expired_at: mins(30),
            },
        ];
        Given::with(())
            .given(given.clone())
            .when(BudgetCommand::Capture {
                reservation_id: id(7),
                amount: amount("1"),
                at: mins(31),
            })
            .then_expect_error(BudgetError::ReservationExpired);
        Given::with(())
            .given(given)
            .when(BudgetCommand::Release {
                reservation_id: id(7),
                at: mins(31),
            })
            .then_expect_events(vec![]);
        // Due but not yet recorded: the capture comes too late all the same.
        Given::with(())
            .given(vec![hundred(), reserved(7, "60", mins(30), mins(1))])
            .when(BudgetCommand::Capture {
                reservation_id: id(7),
                amount: amount("1"),
                at: mins(30),
            })
            .then_expect_error(BudgetError::ReservationExpired);
    }

    #[test]
    fn a_settled_hold_is_forgotten_a_week_after_its_expiry() {
        let given = vec![
            hundred(),
            reserved(7, "60", mins(30), mins(1)),
            BudgetEvent::ReservationReleased {
                reservation_id: id(7),
                amount: amount("60"),
                released_at: mins(2),
            },
            spent(1, "1", None, mins(30) + SETTLED_RETENTION),
        ];
        assert!(state_after(&given).settled.is_empty());
        assert!(state_after(&given[..3]).settled.contains_key(&id(7)));
    }

    #[test]
    fn setting_the_limit_records_only_a_change_and_announces_thresholds_it_brings() {
        let given = vec![hundred(), spent(1, "50", None, mins(1))];
        Given::with(())
            .given(given.clone())
            .when(BudgetCommand::SetLimit {
                limit: Some(limit("100")),
                at: mins(2),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(given.clone())
            .when(BudgetCommand::SetLimit {
                limit: Some(limit("60")),
                at: mins(2),
            })
            .then_expect_events(vec![
                BudgetEvent::BudgetLimitSet {
                    limit: Some(limit("60")),
                    set_at: mins(2),
                },
                crossed(80, "50", "60", None, mins(2)),
            ]);
        Given::with(())
            .given(given)
            .when(BudgetCommand::SetLimit {
                limit: None,
                at: mins(2),
            })
            .then_expect_events(vec![BudgetEvent::BudgetLimitSet {
                limit: None,
                set_at: mins(2),
            }]);
    }

    #[test]
    fn a_budget_name_is_trimmed_and_must_be_1_to_200_characters() {
        assert_eq!(BudgetName::parse("  AI  ").unwrap().as_str(), "AI");
        assert!(BudgetName::parse(" ").is_err());
        assert!(BudgetName::parse(&"x".repeat(201)).is_err());
        assert!(GracePercent::new(100).is_ok());
        assert!(GracePercent::new(101).is_err());
    }

    #[test]
    fn categories_and_periods_read_and_write_their_api_names() {
        assert_eq!(SpendCategory::parse("ai"), Some(SpendCategory::Ai));
        assert_eq!(SpendCategory::parse("AI"), None);
        assert_eq!(BudgetPeriod::parse("monthly"), Some(BudgetPeriod::Monthly));
        assert_eq!(BudgetPeriod::parse("weekly"), None);
        assert_eq!(serde_json::to_value(BudgetPeriod::None).unwrap(), "none");
        assert_eq!(
            serde_json::to_value(SpendCategory::Enrichment).unwrap(),
            "enrichment"
        );
    }

    #[test]
    fn events_keep_their_stored_type_names_and_money_as_strings() {
        let event = spent(1, "12.34", day("2026-11-10"), mins(1));
        assert_eq!(event.event_type(), "SpendRecorded");
        assert_eq!(event.event_version(), "1.0");
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["SpendRecorded"]["amount"], "12.34");
        assert_eq!(serde_json::from_value::<BudgetEvent>(json).unwrap(), event);
        let snapshot = serde_json::to_value(state_after(&[hundred(), event])).unwrap();
        assert_eq!(snapshot["spent_in_period"], "12.34");
        assert_eq!(snapshot["limit"], "100.00");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Spend(i64),
        Reserve(i64, i64),
        Capture(usize, i64),
        Release(usize),
        Advance(i64),
        Expire,
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1_i64..=6_000).prop_map(Op::Spend),
            ((1_i64..=6_000), (1_i64..=180)).prop_map(|(c, m)| Op::Reserve(c, m)),
            (any::<usize>(), 1_i64..=100).prop_map(|(i, p)| Op::Capture(i, p)),
            any::<usize>().prop_map(Op::Release),
            (0_i64..=600).prop_map(Op::Advance),
            Just(Op::Expire),
        ]
    }

    fn cents(n: i64) -> Money {
        Money::from_decimal(Decimal::new(n, 2)).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn no_sequence_of_spends_and_holds_takes_spent_plus_reserved_over_the_limit(
            limit_cents in 0_i64..=20_000,
            period in prop::sample::select(vec![BudgetPeriod::None, BudgetPeriod::Daily, BudgetPeriod::Monthly]),
            ops in prop::collection::vec(any_op(), 1..40),
        ) {
            let limit = Limit::new(cents(limit_cents)).unwrap();
            // Late on the last day of a month, so days and months roll over.
            let mut now = time("2026-11-30T20:00:00Z");
            let mut events = vec![BudgetEvent::BudgetCreated {
                name: BudgetName::parse("p").unwrap(),
                limit: Some(limit),
                period,
                grace_percent: GracePercent::default(),
                created_at: now,
            }];
            let mut holds: Vec<Uuid> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                let budget = state_after(&events);
                let command = match op {
                    Op::Advance(minutes) => {
                        now += Duration::minutes(minutes);
                        continue;
                    }
                    Op::Spend(c) => BudgetCommand::Spend {
                        spend_id: id(n as u128),
                        amount: PositiveAmount::new(cents(c)).unwrap(),
                        category: SpendCategory::Other,
                        description: None,
                        model: None,
                        input_tokens: None,
                        output_tokens: None,
                        at: now,
                    },
                    Op::Reserve(c, minutes) => {
                        BudgetCommand::Reserve {
                            reservation_id: id(1000 + n as u128),
                            amount: PositiveAmount::new(cents(c)).unwrap(),
                            category: SpendCategory::Ai,
                            expires_at: now + Duration::minutes(minutes),
                            at: now,
                        }
                    }
                    Op::Capture(i, percent) if !holds.is_empty() => {
                        let rid = holds[i % holds.len()];
                        let held = budget
                            .holds
                            .get(&rid)
                            .map(|h| h.amount.money().as_decimal())
                            .unwrap_or(Decimal::ONE);
                        let part = (held * Decimal::from(percent) / Decimal::ONE_HUNDRED)
                            .round_dp_with_strategy(2, RoundingStrategy::ToZero)
                            .max(Decimal::new(1, 2));
                        BudgetCommand::Capture {
                            reservation_id: rid,
                            amount: PositiveAmount::new(Money::from_decimal(part).unwrap()).unwrap(),
                            at: now,
                        }
                    }
                    Op::Release(i) if !holds.is_empty() => BudgetCommand::Release {
                        reservation_id: holds[i % holds.len()],
                        at: now,
                    },
                    Op::Capture(..) | Op::Release(_) | Op::Expire => {
                        BudgetCommand::ExpireReservations { at: now }
                    }
                };
                let result = Given::with(())
                    .given(events.clone())
                    .when(command.clone())
                    .inspect_result();
                match result {
                    Ok(new) => {
                        if let BudgetCommand::Reserve { reservation_id, .. } = &command {
                            holds.push(*reservation_id);
                        }
                        events.extend(new);
                    }
                    Err(BudgetError::BudgetExceeded { .. }) => {
                        // Refused only when it really would not fit.
                        let amount = match &command {
                            BudgetCommand::Spend { amount, .. }
                            | BudgetCommand::Reserve { amount, .. } => amount.money(),
                            other => panic!("{other:?} cannot exceed a budget"),
                        };
                        let used = budget.spent_at(now).as_decimal()
                            + budget.reserved_at(now).as_decimal()
                            + amount.as_decimal();
                        prop_assert!(used > limit.money().as_decimal());
                    }
                    Err(BudgetError::ReservationNotFound) => {
                        // Only a hold forgotten after SETTLED_RETENTION.
                        let (BudgetCommand::Capture { reservation_id, .. }
                        | BudgetCommand::Release { reservation_id, .. }) = &command
                        else {
                            panic!("{command:?} names no reservation");
                        };
                        prop_assert!(!budget.holds.contains_key(reservation_id));
                        prop_assert!(!budget.settled.contains_key(reservation_id));
                    }
                    Err(
                        BudgetError::ReservationExpired
                        | BudgetError::ReservationReleased
                        | BudgetError::CaptureExceedsHold { .. },
                    ) => {}
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                }
                let budget = state_after(&events);
                let used = budget.spent_at(now).checked_add(budget.reserved_at(now)).unwrap();
                prop_assert!(used <= limit.money(), "{used} > {limit} after {command:?}");
                prop_assert!(budget.spent_in_period <= limit.money());
            }
        }
    }
}
