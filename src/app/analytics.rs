//! Analytics reports over the read models: costs (read model `costs`), a campaign's
//! timeseries (read model `enrollments`, per UTC day) and the dashboard (totals kept by
//! every read model), and the catch-up of read models for readers outside a server. Each
//! report is built by one function shared by the API and `leadledger analytics`, so the
//! command line prints exactly what the API answers with.

use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use projections::costs::{self, CostRow, GroupBy};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::error::AppError;

pub const COSTS_READ_MODEL: &str = projections::costs::NAME;
/// The read models behind the cost report (budget names come from `budgets`).
pub const COSTS_READ_MODELS: [&str; 2] =
    [COSTS_READ_MODEL, crate::app::budgets::BUDGETS_READ_MODEL];

/// What a cost report covers: the last `days` UTC days (today included), added up by
/// `group_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostsParams {
    pub days: u16,
    pub group_by: GroupBy,
}

impl CostsParams {
    pub const DEFAULT_DAYS: u16 = 30;
    pub const MAX_DAYS: u16 = 365;

    /// The query parameters as given (absent: the defaults).
    pub fn parse(days: Option<&str>, group_by: Option<&str>) -> Result<Self, AppError> {
        Ok(Self {
            days: days
                .map(parse_days)
                .transpose()
                .map_err(AppError::BadRequest)?
                .unwrap_or(Self::DEFAULT_DAYS),
            group_by: group_by
                .map(parse_group_by)
                .transpose()
                .map_err(AppError::BadRequest)?
                .unwrap_or_default(),
        })
    }
}

/// `days`: digits only, 1..=365. Anything else (signs, spaces, `30;…`) is refused rather
/// than read leniently.
pub fn parse_days(text: &str) -> Result<u16, String> {
    let refuse = || {
        format!(
            "days must be a whole number from 1 to {}",
            CostsParams::MAX_DAYS
        )
    };
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse());
    }
    match text.parse::<u16>() {
        Ok(n) if (1..=CostsParams::MAX_DAYS).contains(&n) => Ok(n),
        _ => Err(refuse()),
    }
}

/// `group_by`: day | model | category | budget.
pub fn parse_group_by(text: &str) -> Result<GroupBy, String> {
    GroupBy::parse(text)
        .ok_or_else(|| "group_by must be one of day, model, category, budget".to_string())
}

/// One line of a cost report. Only the grouping field is present (`model` may be null:
/// the costs recorded without a model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CostItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<NaiveDate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_id: Option<Uuid>,
    /// The budget's name, beside `budget_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Exact decimal string.
    pub cost: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Spends and captured reservations counted.
    pub requests: i64,
}

impl CostItem {
    fn new(row: CostRow, group_by: GroupBy) -> Self {
        Self {
            day: row.day,
            model: (group_by == GroupBy::Model).then_some(row.model),
            category: row.category,
            budget_id: row.budget_id,
            name: None,
            // Written like every other amount (at least two decimals); a sum of amounts
            // that each fit Money fits it too, and the fallback only guards that.
            cost: aggregates::money::Money::from_decimal(row.cost)
                .map(|m| m.to_string())
                .unwrap_or_else(|_| row.cost.normalize().to_string()),
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            requests: row.requests,
        }
    }

    /// The value of the grouping column, as text (for tables and CSV).
    pub fn key(&self) -> String {
        if let Some(day) = self.day {
            return day.to_string();
        }
        if let Some(model) = &self.model {
            return model.clone().unwrap_or_default();
        }
        if let Some(category) = &self.category {
            return category.clone();
        }
        self.budget_id.map(|b| b.to_string()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CostReport {
    /// First UTC day covered.
    pub from: NaiveDate,
    /// Last UTC day covered (today).
    pub to: NaiveDate,
    /// day | model | category | budget
    pub group_by: String,
    pub items: Vec<CostItem>,
}

/// The cost report for `params`, with `today` as the last day.
pub async fn cost_report(
    conn: &mut PgConnection,
    params: CostsParams,
    today: NaiveDate,
) -> Result<CostReport, sqlx::Error> {
    let from = today - chrono::Days::new(u64::from(params.days) - 1);
    let rows = costs::report(conn, from, today, params.group_by).await?;
    let mut items: Vec<CostItem> = rows
        .into_iter()
        .map(|row| CostItem::new(row, params.group_by))
        .collect();
    match params.group_by {
        // Every day of the window, as the campaign timeseries lists them: a day without
        // costs is a line of zeros, not a gap.
        GroupBy::Day => {
            let mut by_day: std::collections::HashMap<NaiveDate, CostItem> = items
                .into_iter()
                .filter_map(|i| Some((i.day?, i)))
                .collect();
            items = from
                .iter_days()
                .take_while(|d| *d <= today)
                .map(|day| {
                    by_day.remove(&day).unwrap_or(CostItem {
                        day: Some(day),
                        model: None,
                        category: None,
                        budget_id: None,
                        name: None,
                        cost: money_text(sqlx::types::Decimal::ZERO),
                        input_tokens: 0,
                        output_tokens: 0,
                        requests: 0,
                    })
                })
                .collect();
        }
        GroupBy::Budget => {
            let ids: Vec<Uuid> = items.iter().filter_map(|i| i.budget_id).collect();
            let names = projections::budgets::names(conn, &ids).await?;
            for item in &mut items {
                item.name = item.budget_id.and_then(|id| names.get(&id).cloned());
            }
        }
        _ => {}
    }
    Ok(CostReport {
        from,
        to: today,
        group_by: params.group_by.as_str().to_string(),
        items,
    })
}

/// Brings the read models `names` up to the last event committed, for a reader outside the
/// server (the command line). It runs their projections the way a server process does,
/// under the same advisory locks: if a server is running, that server applies the events
/// and this only waits. Returns whether they got there within `timeout`.
pub async fn catch_up(
    pool: &PgPool,
    names: &[&str],
    timeout: Duration,
) -> Result<bool, sqlx::Error> {
    let head = projections::feed::head(&mut *pool.acquire().await?).await?;
    let Some(head) = head else {
        return Ok(true);
    };
    let cancel = CancellationToken::new();
    let runner = projections::runner::Runner::new(
        pool.clone(),
        projections::all()
            .into_iter()
            .filter(|p| names.contains(&p.name()))
            .collect(),
        projections::runner::RunnerConfig::default(),
    );
    let task = tokio::spawn(runner.run(cancel.clone()));
    let reached = projections::runner::wait_for(pool, head, names, timeout).await;
    cancel.cancel();
    let _ = task.await;
    reached
}

/// The read models behind the dashboard.
pub const DASHBOARD_READ_MODELS: [&str; 4] = [
    projections::campaigns::NAME,
    projections::contacts::NAME,
    projections::costs::NAME,
    ENROLLMENTS_READ_MODEL,
];
pub const ENROLLMENTS_READ_MODEL: &str = projections::enrollments::NAME;

/// Counts of one UTC day of a campaign: enrollments that reached each milestone that day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct DayCounts {
    pub day: NaiveDate,
    pub enrolled: i64,
    pub sent: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub replied: i64,
    pub bounced: i64,
    pub unsubscribed: i64,
    pub complained: i64,
}

impl DayCounts {
    pub const COLUMNS: [&str; 10] = [
        "day",
        "enrolled",
        "sent",
        "delivered",
        "opened",
        "clicked",
        "replied",
        "bounced",
        "unsubscribed",
        "complained",
    ];

    pub fn counts(&self) -> [i64; 9] {
        [
            self.enrolled,
            self.sent,
            self.delivered,
            self.opened,
            self.clicked,
            self.replied,
            self.bounced,
            self.unsubscribed,
            self.complained,
        ]
    }
}

/// A campaign's days, oldest first, every day of the window present (zeros included).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Timeseries {
    pub campaign_id: Uuid,
    /// First UTC day covered.
    pub from: NaiveDate,
    /// Last UTC day covered (today).
    pub to: NaiveDate,
    pub days: Vec<DayCounts>,
}

/// The last `days` UTC days of `campaign`, `today` the last.
pub async fn campaign_timeseries(
    conn: &mut PgConnection,
    campaign: Uuid,
    days: u16,
    today: NaiveDate,
) -> Result<Timeseries, sqlx::Error> {
    let from = today - chrono::Days::new(u64::from(days) - 1);
    let days = projections::enrollments::campaign_days(conn, campaign, from, today)
        .await?
        .into_iter()
        .map(|d| DayCounts {
            day: d.day,
            enrolled: d.enrolled,
            sent: d.sent,
            delivered: d.delivered,
            opened: d.opened,
            clicked: d.clicked,
            replied: d.replied,
            bounced: d.bounced,
            unsubscribed: d.unsubscribed,
            complained: d.complained,
        })
        .collect();
    Ok(Timeseries {
        campaign_id: campaign,
        from,
        to: today,
        days,
    })
}

/// Campaigns by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct CampaignCounts {
    pub total: i64,
    pub draft: i64,
    pub running: i64,
    pub paused: i64,
    pub completed: i64,
}

/// Enrollments that reached each milestone, over every campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct MilestoneCounts {
    pub sent: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub replied: i64,
    pub bounced: i64,
    pub unsubscribed: i64,
    pub complained: i64,
}

/// Cost recorded this UTC month (spends and captured reservations of every budget).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MonthSpend {
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// Exact decimal string.
    pub cost: String,
    pub requests: i64,
}

/// A campaign among the best by reply rate (replied / delivered, in percent).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TopCampaign {
    pub campaign_id: Uuid,
    pub name: String,
    pub status: String,
    pub delivered: i64,
    pub replied: i64,
    pub reply_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Dashboard {
    pub contacts: i64,
    pub campaigns: CampaignCounts,
    pub enrollments: i64,
    pub milestones: MilestoneCounts,
    pub spend_this_month: MonthSpend,
    /// Up to five campaigns that delivered mail, highest reply rate first (ties: more
    /// replies first).
    pub top_campaigns: Vec<TopCampaign>,
}

/// How many campaigns the dashboard ranks.
pub const TOP_CAMPAIGNS: i64 = 5;

/// The dashboard, with `today` as the current UTC day. Every figure is a kept total or a
/// read of a few rows; nothing here grows with the number of events or contacts.
pub async fn dashboard_report(
    conn: &mut PgConnection,
    today: NaiveDate,
) -> Result<Dashboard, sqlx::Error> {
    let contacts = projections::contacts::total(conn).await?;
    let mut campaigns = CampaignCounts::default();
    for row in projections::campaigns::count_by_status(conn).await? {
        campaigns.total += row.n;
        match row.status.as_str() {
            "draft" => campaigns.draft = row.n,
            "running" => campaigns.running = row.n,
            "paused" => campaigns.paused = row.n,
            "completed" => campaigns.completed = row.n,
            _ => {}
        }
    }
    let totals = projections::enrollments::totals(conn).await?;
    let month_start = today.with_day(1).unwrap_or(today);
    let (cost, requests) = costs::total(conn, month_start, today).await?;
    let top_campaigns = projections::enrollments::top_by_reply_rate(conn, TOP_CAMPAIGNS)
        .await?
        .into_iter()
        .map(|r| TopCampaign {
            campaign_id: r.campaign_id,
            name: r.name,
            status: r.status,
            delivered: r.delivered,
            replied: r.replied,
            reply_rate: rate(r.replied, r.delivered),
        })
        .collect();
    Ok(Dashboard {
        contacts,
        campaigns,
        enrollments: totals.enrolled,
        milestones: MilestoneCounts {
            sent: totals.sent,
            delivered: totals.delivered,
            opened: totals.opened,
            clicked: totals.clicked,
            replied: totals.replied,
            bounced: totals.bounced,
            unsubscribed: totals.unsubscribed,
            complained: totals.complained,
        },
        spend_this_month: MonthSpend {
            from: month_start,
            to: today,
            cost: money_text(cost),
            requests,
        },
        top_campaigns,
    })
}

/// `part / whole × 100`, rounded to 2 decimals; 0 when `whole` is 0.
pub fn rate(part: i64, whole: i64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    // Integer arithmetic first, so 2/3 rounds to 66.67 exactly as a person would.
    let hundredths = (part as i128 * 100_000 / whole as i128 + 5) / 10;
    hundredths as f64 / 100.0
}

/// Money as every amount is written (at least two decimals).
fn money_text(amount: sqlx::types::Decimal) -> String {
    aggregates::money::Money::from_decimal(amount)
        .map(|m| m.to_string())
        .unwrap_or_else(|_| amount.normalize().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_digits_from_1_to_365_and_nothing_else() {
        for ok in ["1", "30", "365", "007"] {
            assert!(parse_days(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0",
            "366",
            "abc",
            "+30",
            "-1",
            " 30",
            "30 ",
            "30;DROP TABLE events",
            "1e2",
            "3.0",
            "99999999999999999999",
        ] {
            assert!(parse_days(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn absent_parameters_mean_30_days_by_day() {
        let params = CostsParams::parse(None, None).unwrap();
        assert_eq!(params.days, 30);
        assert_eq!(params.group_by, GroupBy::Day);
        assert!(matches!(
            CostsParams::parse(None, Some("week")),
            Err(AppError::BadRequest(_))
        ));
    }

    #[test]
    fn an_item_shows_its_grouping_field_only_and_money_as_a_string() {
        let row = CostRow {
            day: None,
            model: None,
            category: None,
            budget_id: None,
            cost: sqlx::types::Decimal::new(9_900_000, 6),
            input_tokens: 10,
            output_tokens: 20,
            requests: 3,
        };
        let item = serde_json::to_value(CostItem::new(row, GroupBy::Model)).unwrap();
        assert_eq!(
            item,
            serde_json::json!({
                "model": null,
                "cost": "9.90",
                "input_tokens": 10,
                "output_tokens": 20,
                "requests": 3
            })
        );
    }

    #[test]
    fn rates_are_percentages_rounded_to_two_decimals_and_zero_over_zero() {
        assert_eq!(rate(2, 3), 66.67);
        assert_eq!(rate(1, 3), 33.33);
        assert_eq!(rate(1, 8), 12.5);
        assert_eq!(rate(5, 5), 100.0);
        assert_eq!(rate(0, 7), 0.0);
        assert_eq!(rate(3, 0), 0.0);
    }
}
