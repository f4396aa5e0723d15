//! How the command line shows a report — JSON, aligned columns or RFC 4180 CSV — through
//! one function, [`print`]. The reports themselves are `app::analytics`'s, the same values
//! the API answers with.

use serde::Serialize;

use crate::app::analytics::{CostReport, Dashboard, DayCounts, Timeseries};
use crate::cli::ReportFormat;

/// A report the command line can show as a table and as CSV (JSON is its `Serialize`).
pub trait Tabular {
    /// Aligned columns for people.
    fn table(&self) -> String;
    /// RFC 4180 CSV with a header row.
    fn csv(&self) -> String;
}

/// Prints `report` in `format` on standard output.
pub fn print<R: Serialize + Tabular>(format: ReportFormat, report: &R) -> anyhow::Result<()> {
    match format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(report)?),
        ReportFormat::Table => print!("{}", report.table()),
        ReportFormat::Csv => print!("{}", report.csv()),
    }
    Ok(())
}

/// The name of the grouping column in tables and CSV.
fn key_header(report: &CostReport) -> &str {
    if report.group_by == "budget" {
        "budget_id"
    } else {
        &report.group_by
    }
}

impl Tabular for CostReport {
    /// Aligned columns for people; a model-less line shows as `(none)`.
    fn table(&self) -> String {
        let keys: Vec<String> = self
            .items
            .iter()
            .map(|i| match (&i.model, &i.name) {
                (Some(None), _) => "(none)".to_string(),
                (_, Some(name)) => format!("{}  {name}", i.key()),
                _ => i.key(),
            })
            .collect();
        let width = keys
            .iter()
            .map(|k| k.chars().count())
            .chain([key_header(self).len()])
            .max()
            .unwrap_or(0);
        let cost_width = self
            .items
            .iter()
            .map(|i| i.cost.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        let mut out = format!(
            "costs from {} to {} (UTC) by {}\n{:<width$}  {:>cost_width$}  {:>13}  {:>13}  {:>8}\n",
            self.from,
            self.to,
            self.group_by,
            key_header(self),
            "cost",
            "input_tokens",
            "output_tokens",
            "requests",
        );
        for (item, key) in self.items.iter().zip(&keys) {
            out.push_str(&format!(
                "{key:<width$}  {:>cost_width$}  {:>13}  {:>13}  {:>8}\n",
                item.cost, item.input_tokens, item.output_tokens, item.requests
            ));
        }
        if self.items.is_empty() {
            out.push_str("(no costs recorded in these days)\n");
        }
        out
    }

    /// RFC 4180 CSV with a header row; a model-less line has an empty model. By budget,
    /// the budget's name is a column of its own after its id.
    fn csv(&self) -> String {
        let by_budget = self.group_by == "budget";
        let mut out = format!(
            "{}{},cost,input_tokens,output_tokens,requests\r\n",
            key_header(self),
            if by_budget { ",name" } else { "" }
        );
        for item in &self.items {
            let name = if by_budget {
                format!(",{}", csv_field(item.name.as_deref().unwrap_or("")))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{}{name},{},{},{},{}\r\n",
                csv_field(&item.key()),
                item.cost,
                item.input_tokens,
                item.output_tokens,
                item.requests
            ));
        }
        out
    }
}

/// Quotes a field that holds a comma, a quote or a line break (model and campaign names
/// are free text). A field a spreadsheet would run as a formula (starting with `=`, `+`,
/// `-`, `@`, a tab or a carriage return) is written with a leading `'`, so it stays text.
pub fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

impl Tabular for Timeseries {
    /// Aligned columns for people.
    fn table(&self) -> String {
        let mut out = format!(
            "campaign {} from {} to {} (UTC)\n{:<10}",
            self.campaign_id,
            self.from,
            self.to,
            DayCounts::COLUMNS[0]
        );
        for c in &DayCounts::COLUMNS[1..] {
            out.push_str(&format!("  {c:>12}"));
        }
        out.push('\n');
        for day in &self.days {
            out.push_str(&format!("{:<10}", day.day.to_string()));
            for n in day.counts() {
                out.push_str(&format!("  {n:>12}"));
            }
            out.push('\n');
        }
        out
    }

    /// RFC 4180 CSV with a header row.
    fn csv(&self) -> String {
        let mut out = DayCounts::COLUMNS.join(",") + "\r\n";
        for day in &self.days {
            let counts: Vec<String> = day.counts().iter().map(i64::to_string).collect();
            out.push_str(&format!("{},{}\r\n", day.day, counts.join(",")));
        }
        out
    }
}

/// The dashboard as `(metric, value)` lines: what the table and the CSV show.
fn lines(d: &Dashboard) -> Vec<(String, String)> {
    let mut lines = vec![
        ("contacts".to_string(), d.contacts.to_string()),
        ("campaigns".into(), d.campaigns.total.to_string()),
        ("campaigns.draft".into(), d.campaigns.draft.to_string()),
        ("campaigns.running".into(), d.campaigns.running.to_string()),
        ("campaigns.paused".into(), d.campaigns.paused.to_string()),
        (
            "campaigns.completed".into(),
            d.campaigns.completed.to_string(),
        ),
        ("enrollments".into(), d.enrollments.to_string()),
    ];
    let m = &d.milestones;
    for (name, n) in [
        ("sent", m.sent),
        ("delivered", m.delivered),
        ("opened", m.opened),
        ("clicked", m.clicked),
        ("replied", m.replied),
        ("bounced", m.bounced),
        ("unsubscribed", m.unsubscribed),
        ("complained", m.complained),
    ] {
        lines.push((format!("milestones.{name}"), n.to_string()));
    }
    let s = &d.spend_this_month;
    lines.push((
        format!("spend_this_month ({} to {})", s.from, s.to),
        s.cost.clone(),
    ));
    lines.push(("spend_this_month.requests".into(), s.requests.to_string()));
    for (i, c) in d.top_campaigns.iter().enumerate() {
        lines.push((
            format!("top_campaigns.{}", i + 1),
            format!(
                "{} ({}, {}): reply rate {}% ({} of {})",
                c.name, c.campaign_id, c.status, c.reply_rate, c.replied, c.delivered
            ),
        ));
    }
    lines
}

impl Tabular for Dashboard {
    fn table(&self) -> String {
        let lines = lines(self);
        let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        lines
            .iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }

    /// RFC 4180 CSV, one figure a row, everything in columns of its own: `metric,value`
    /// for the totals; `from,to` for this month's spend; `rank` and the campaign's
    /// `campaign_id,name,status,delivered,replied,reply_rate` for each top campaign.
    fn csv(&self) -> String {
        const COLUMNS: [&str; 11] = [
            "metric",
            "value",
            "from",
            "to",
            "rank",
            "campaign_id",
            "name",
            "status",
            "delivered",
            "replied",
            "reply_rate",
        ];
        let mut out = COLUMNS.join(",") + "\r\n";
        let mut row = |cells: [String; 11]| {
            let cells: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
            out.push_str(&cells.join(","));
            out.push_str("\r\n");
        };
        let s = &self.spend_this_month;
        for (metric, value) in lines(self) {
            if metric.starts_with("spend_this_month") || metric.starts_with("top_campaigns") {
                continue;
            }
            row([
                metric,
                value,
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for (metric, value) in [
            ("spend_this_month", s.cost.clone()),
            ("spend_this_month.requests", s.requests.to_string()),
        ] {
            row([
                metric.into(),
                value,
                s.from.to_string(),
                s.to.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for (i, c) in self.top_campaigns.iter().enumerate() {
            row([
                "top_campaign".into(),
                c.reply_rate.to_string(),
                String::new(),
                String::new(),
                (i + 1).to_string(),
                c.campaign_id.to_string(),
                c.name.clone(),
                c.status.clone(),
                c.delivered.to_string(),
                c.replied.to_string(),
                c.reply_rate.to_string(),
            ]);
        }
        out
    }
}
