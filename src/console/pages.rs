//! The console's pages and forms: each page reads through `app` what the matching JSON
//! route reads (so their numbers agree) and renders it; each form checks its session,
//! CSRF token and scope before it calls the same `app` command as the API.

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::app::App;
use crate::app::analytics::{self, CostsParams};
use crate::app::reads::{
    self, CAMPAIGN_STATUSES, ENROLLMENT_STATUSES, GroupBy, MetricsRow, Transition,
};
use crate::app::{privacy, sources, suppressions, webhooks};

use super::charts::{self, Series};
use super::format::{count, duration, maybe_time, money, percent, rate, time};
use super::{
    Session, acting, app_error, csrf_field, encode_cursor, error_page, page_shell, session, signin,
    time_cursor,
};

/// Rows a list page shows.
const PAGE: i64 = 50;
/// Days a timeseries or cost chart covers.
const DAYS: u16 = 30;

type Page = Result<Response, Response>;

fn render(title: &str, s: &Session, current: &str, content: Markup) -> Response {
    page_shell(title, Some(s), current, content).into_response()
}

/// Query parameters of a page; anything not listed is refused (as the API does).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    cursor: Option<String>,
    q: Option<String>,
    done: Option<String>,
    parked: Option<String>,
    dead: Option<String>,
    sources: Option<String>,
}

fn query(raw: Option<String>) -> Result<ListQuery, Response> {
    serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| error_page(StatusCode::BAD_REQUEST, &format!("Bad query: {e}.")))
}

fn notice(done: Option<&str>) -> Markup {
    let text = match done {
        Some("start") => "The campaign was started.",
        Some("pause") => "The campaign was paused.",
        Some("complete") => "The campaign was completed.",
        Some("retried") => "The dead letter was put back in the queue; it is retried now.",
        Some("suppressed") => "The contact is on the suppression list: it will not be enrolled.",
        Some("erased") => "The contact was erased: its personal data can no longer be read.",
        _ => return html! {},
    };
    html! { p.notice role="status" { (text) } }
}

fn next_link(base: &str, param: &str, cursor: Option<String>, keep: &[(&str, &str)]) -> Markup {
    let Some(cursor) = cursor else {
        return html! {};
    };
    let mut pairs = form_urlencoded::Serializer::new(String::new());
    for (k, v) in keep {
        if !v.is_empty() {
            pairs.append_pair(k, v);
        }
    }
    pairs.append_pair(param, &cursor);
    html! { p.more { a rel="next" href=(format!("{base}?{}", pairs.finish())) { "Next page →" } } }
}

/// Keeps at most `limit` of `items` and gives the cursor of the last one kept when more
/// were read.
fn cut<T, K: serde::Serialize>(
    items: &mut Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> K,
) -> Option<String> {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|i| encode_cursor(&key(i)))
    } else {
        None
    }
}

fn badge(status: &str) -> Markup {
    html! { span class=(format!("badge b-{status}")) { (status) } }
}

fn stat(label: &str, metric: &str, value: String) -> Markup {
    html! {
        div.stat {
            span.label { (label) }
            span.value data-metric=(metric) { (value) }
        }
    }
}

/// The overview: `GET /v1/analytics/dashboard`'s figures, this month's spend against the
/// budgets, and the projections' health.
pub async fn overview(State(app): State<App>, headers: HeaderMap) -> Page {
    let s = session(&app, &headers).await?;
    let now = Utc::now();
    let mut conn = app.pool.acquire().await.map_err(|e| app_error(e.into()))?;
    let d = analytics::dashboard_report(&mut conn, now.date_naive())
        .await
        .map_err(|e| app_error(e.into()))?;
    drop(conn);
    let budgets = reads::budgets(&app, None, 6, now)
        .await
        .map_err(app_error)?;
    let (status, rebuild, horizon) = reads::operations(&app)
        .await
        .map_err(|e| app_error(e.into()))?;
    let failed = status.iter().filter(|p| p.state == "failed").count();
    let behind: i64 = status.iter().map(|p| p.behind).max().unwrap_or(0);
    let m = &d.milestones;
    let funnel: [(&str, i64); 6] = [
        ("enrolled", d.enrollments),
        ("sent", m.sent),
        ("delivered", m.delivered),
        ("opened", m.opened),
        ("clicked", m.clicked),
        ("replied", m.replied),
    ];
    Ok(render(
        "Overview",
        &s,
        "overview",
        html! {
            h1 { "Overview" }
            section.stats {
                (stat("Contacts", "contacts", count(d.contacts)))
                (stat("Campaigns", "campaigns", count(d.campaigns.total)))
                (stat("Enrollments", "enrollments", count(d.enrollments)))
                (stat("Spend this month", "spend", money(&d.spend_this_month.cost)))
            }
            div.grid {
                section.panel {
                    h2 { "Campaigns by status" }
                    ul.chips {
                        @for (name, n) in [("draft", d.campaigns.draft), ("running", d.campaigns.running), ("paused", d.campaigns.paused), ("completed", d.campaigns.completed)] {
                            li { (badge(name)) " " span data-metric=(format!("campaigns.{name}")) { (count(n)) } }
                        }
                    }
                    h2 { "Milestones" }
                    (funnel_rows(&funnel, "milestones"))
                    p.small {
                        "Bounced " span data-metric="milestones.bounced" { (count(m.bounced)) }
                        " · unsubscribed " span data-metric="milestones.unsubscribed" { (count(m.unsubscribed)) }
                        " · complained " span data-metric="milestones.complained" { (count(m.complained)) }
                    }
                }
                section.panel {
                    h2 { "Top campaigns by reply rate" }
                    @if d.top_campaigns.is_empty() {
                        p.muted { "No campaign has delivered mail yet." }
                    } @else {
                        div.scroll { table.list {
                            thead { tr { th { "Campaign" } th.num { "Delivered" } th.num { "Replied" } th.num { "Reply rate" } } }
                            tbody {
                                @for c in &d.top_campaigns {
                                    tr data-campaign=(c.campaign_id) {
                                        td { a href=(format!("/console/campaigns/{}", c.campaign_id)) { (c.name) } " " (badge(&c.status)) }
                                        td.num { (count(c.delivered)) }
                                        td.num { (count(c.replied)) }
                                        td.num data-metric="reply_rate" { (percent(c.reply_rate)) }
                                    }
                                }
                            }
                        } }
                    }
                }
                section.panel {
                    h2 { "Spend this month against budgets" }
                    p.small { (d.spend_this_month.from) " to " (d.spend_this_month.to) ": "
                        strong { (money(&d.spend_this_month.cost)) } " over " (count(d.spend_this_month.requests)) " requests" }
                    (budget_rows(&budgets.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>()))
                    p { a href="/console/budgets" { "Every budget and its costs →" } }
                }
                section.panel {
                    h2 { "Projection health" }
                    @if failed > 0 {
                        p.alert { (failed) " projection(s) failed: see " a href="/console/operations" { "Operations" } "." }
                    } @else {
                        p { span.ok { "●" } " All " (status.len()) " projections healthy." }
                    }
                    p.small { "Most events behind: " span data-metric="behind" { (count(behind)) } }
                    @if let Some(r) = &rebuild {
                        p.small { "Rebuild in progress: " (r.projections.join(", ")) " (" (count(r.events)) " events so far)" }
                    }
                    @if let Some(secs) = horizon.held_for_secs {
                        p.small { "Feed horizon held for " (duration(secs)) }
                    }
                }
            }
            p.small.muted { "As of " (time(now, now)) "." }
        },
    ))
}

/// Rows of a funnel: each step as a bar against the first, with its count and its share
/// of the step before.
fn funnel_rows(steps: &[(&str, i64)], prefix: &str) -> Markup {
    let first = steps.first().map(|s| s.1).unwrap_or(0) as f64;
    html! {
        div.funnel {
            @for (i, (name, n)) in steps.iter().enumerate() {
                div.step {
                    span.name { (name) }
                    (charts::bar(*n as f64, first, &format!("fill s-{name}")))
                    span.count data-metric=(format!("{prefix}.{name}")) { (count(*n)) }
                    span.share {
                        @if i > 0 { (rate(*n, steps[i - 1].1)) }
                    }
                }
            }
        }
    }
}

fn period(period: &str) -> String {
    match period {
        "none" => "all time".into(),
        other => other.to_string(),
    }
}

fn budget_rows(budgets: &[reads::BudgetView]) -> Markup {
    let f = |m: &aggregates::money::Money| m.as_decimal().try_into().unwrap_or(0.0_f64);
    html! {
        @if budgets.is_empty() {
            p.muted { "No budget yet." }
        }
        @for b in budgets {
            div.budget data-budget=(b.id) {
                div.head {
                    strong { (b.name) } " "
                    span.muted { (period(&b.period)) }
                }
                (charts::stacked(f(&b.spent), f(&b.reserved), b.limit.as_ref().map(f)))
                p.small {
                    "Spent " span data-metric="budget.spent" { (money(&b.spent.to_string())) }
                    " · reserved " span data-metric="budget.reserved" { (money(&b.reserved.to_string())) }
                    " · limit " span data-metric="budget.limit" {
                        @match &b.limit { Some(l) => (money(&l.to_string())), None => "none (tracking only)" }
                    }
                }
            }
        }
    }
}

/// Campaigns newest first (`GET /v1/campaigns`), with status filter and rates.
pub async fn campaigns(
    State(app): State<App>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Page {
    let s = session(&app, &headers).await?;
    let q = query(raw)?;
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if let Some(st) = status
        && !CAMPAIGN_STATUSES.contains(&st)
    {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "status must be draft, running, paused or completed.",
        ));
    }
    let after = time_cursor(q.cursor.as_deref())?;
    let mut rows = reads::campaigns(&app, status, after, PAGE + 1)
        .await
        .map_err(|e| app_error(e.into()))?;
    let next = cut(&mut rows, PAGE, |(c, _)| (c.created_at, c.id));
    let now = Utc::now();
    Ok(render(
        "Campaigns",
        &s,
        "campaigns",
        html! {
            h1 { "Campaigns" }
            nav.filters aria-label="Status" {
                a href="/console/campaigns" aria-current=[status.is_none().then_some("page")] { "all" }
                @for st in CAMPAIGN_STATUSES {
                    a href=(format!("/console/campaigns?status={st}")) aria-current=[(status == Some(st)).then_some("page")] { (st) }
                }
            }
            @if rows.is_empty() {
                p.muted { "No campaign here." }
            } @else {
                div.scroll {
                    table.list {
                        thead { tr {
                            th { "Campaign" } th { "Status" } th.num { "Enrolled" } th.num { "Delivered" }
                            th.num { "Open rate" } th.num { "Reply rate" } th { "Created" }
                        } }
                        tbody {
                            @for (c, m) in &rows {
                                tr data-campaign=(c.id) {
                                    td { a href=(format!("/console/campaigns/{}", c.id)) { (c.name) } }
                                    td { (badge(&c.status)) }
                                    td.num data-metric="enrolled" { (count(m.enrolled)) }
                                    td.num data-metric="delivered" { (count(m.delivered)) }
                                    td.num { (rate(m.opened, m.delivered)) }
                                    td.num { (rate(m.replied, m.delivered)) }
                                    td { (time(c.created_at, now)) }
                                }
                            }
                        }
                    }
                }
            }
            (next_link("/console/campaigns", "cursor", next, &[("status", status.unwrap_or(""))]))
        },
    ))
}

fn parse_uuid(raw: &str, what: &str) -> Result<Uuid, Response> {
    Uuid::parse_str(raw)
        .map_err(|_| error_page(StatusCode::NOT_FOUND, &format!("No {what} with this id.")))
}

/// A campaign: lifecycle, funnel (`/metrics`), daily chart (`/timeseries`) and its
/// enrollments with a status filter.
pub async fn campaign(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Page {
    let s = session(&app, &headers).await?;
    let id = parse_uuid(&id, "campaign")?;
    let q = query(raw)?;
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if let Some(st) = status
        && !ENROLLMENT_STATUSES.contains(&st)
    {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "That is not an enrollment status.",
        ));
    }
    let after = time_cursor(q.cursor.as_deref())?;
    let (loaded, m) = reads::campaign(&app, id).await.map_err(app_error)?;
    let now = Utc::now();
    let mut conn = app.pool.acquire().await.map_err(|e| app_error(e.into()))?;
    let series = analytics::campaign_timeseries(&mut conn, id, DAYS, now.date_naive())
        .await
        .map_err(|e| app_error(e.into()))?;
    drop(conn);
    let mut enrollments = reads::enrollments(&app, id, status, after, PAGE + 1)
        .await
        .map_err(|e| app_error(e.into()))?;
    let next = cut(&mut enrollments, PAGE, |e| (e.enrolled_at, e.id));
    let c = &loaded.aggregate;
    let st = c.status.as_str();
    let actions: Vec<(&str, &str)> = match st {
        "draft" => vec![("start", "Start")],
        "running" => vec![("pause", "Pause"), ("complete", "Complete")],
        "paused" => vec![("start", "Resume"), ("complete", "Complete")],
        _ => vec![],
    };
    let labels: Vec<String> = series
        .days
        .iter()
        .map(|d| d.day.format("%b %d").to_string())
        .collect();
    let pick = |f: fn(&analytics::DayCounts) -> i64| series.days.iter().map(f).collect::<Vec<_>>();
    let lines = [
        Series {
            name: "enrolled",
            values: pick(|d| d.enrolled),
        },
        Series {
            name: "sent",
            values: pick(|d| d.sent),
        },
        Series {
            name: "delivered",
            values: pick(|d| d.delivered),
        },
        Series {
            name: "opened",
            values: pick(|d| d.opened),
        },
        Series {
            name: "replied",
            values: pick(|d| d.replied),
        },
    ];
    Ok(render(
        &c.name,
        &s,
        "campaigns",
        html! {
            p.crumbs { a href="/console/campaigns" { "Campaigns" } " /" }
            div.titlebar {
                h1 { (c.name) " " (badge(st)) }
                @if !actions.is_empty() {
                    div.actions {
                        @for (action, label) in &actions {
                            form method="post" action=(format!("/console/campaigns/{id}/{action}")) {
                                (csrf_field(&s))
                                button type="submit" data-action=(action) { (label) }
                            }
                        }
                        @if !s.can_act() { span.small.muted { "(a read key cannot act)" } }
                    }
                }
            }
            (notice(q.done.as_deref()))
            p.small.muted {
                "Created " (maybe_time(c.created_at, now)) " · updated " (maybe_time(c.updated_at, now))
                " · stops on reply: " (if c.stop_on_reply { "yes" } else { "no" })
            }
            div.grid {
                section.panel {
                    h2 { "Funnel" }
                    (funnel_rows(&[("enrolled", m.enrolled), ("sent", m.sent), ("delivered", m.delivered), ("opened", m.opened), ("clicked", m.clicked), ("replied", m.replied)], "funnel"))
                    (losses(&m))
                }
                section.panel.wide {
                    h2 { "Last " (DAYS) " days (UTC)" }
                    (charts::lines(&labels, &lines, "Milestones reached per day"))
                    ul.legend {
                        @for l in &lines { li { span class=(format!("key s-{}", l.name)) {} (l.name) } }
                    }
                }
            }
            section.panel {
                h2 { "Enrollments" }
                nav.filters aria-label="Enrollment status" {
                    a href=(format!("/console/campaigns/{id}")) aria-current=[status.is_none().then_some("page")] { "all" }
                    @for e in ENROLLMENT_STATUSES {
                        a href=(format!("/console/campaigns/{id}?status={e}")) aria-current=[(status == Some(e)).then_some("page")] { (e) }
                    }
                }
                @if enrollments.is_empty() {
                    p.muted { "No enrollment here." }
                } @else {
                    div.scroll {
                        table.list {
                            thead { tr { th { "Contact" } th { "Status" } th { "Enrolled" } th { "Last milestone" } } }
                            tbody {
                                @for e in &enrollments {
                                    tr data-enrollment=(e.id) {
                                        td { a.mono href=(format!("/console/contacts/{}", e.contact_id)) { (short(e.contact_id)) } }
                                        td { (badge(&e.status)) }
                                        td { (time(e.enrolled_at, now)) }
                                        td { (maybe_time(last_milestone(e), now)) }
                                    }
                                }
                            }
                        }
                    }
                }
                (next_link(&format!("/console/campaigns/{id}"), "cursor", next, &[("status", status.unwrap_or(""))]))
            }
        },
    ))
}

fn losses(m: &MetricsRow) -> Markup {
    html! {
        p.small {
            "Bounced " span data-metric="funnel.bounced" { (count(m.bounced)) } " (" (rate(m.bounced, m.sent)) " of sent)"
            " · complained " span data-metric="funnel.complained" { (count(m.complained)) }
            " · unsubscribed " span data-metric="funnel.unsubscribed" { (count(m.unsubscribed)) }
        }
    }
}

fn last_milestone(e: &reads::EnrollmentRow) -> Option<DateTime<Utc>> {
    [
        e.sent_at,
        e.delivered_at,
        e.opened_at,
        e.clicked_at,
        e.replied_at,
        e.bounced_at,
        e.unsubscribed_at,
        e.complained_at,
    ]
    .into_iter()
    .flatten()
    .max()
}

fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_string()
}

#[derive(Debug, Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
}

fn action_form(body: &Bytes) -> ActionForm {
    serde_urlencoded::from_bytes(body).unwrap_or(ActionForm {
        csrf: String::new(),
    })
}

/// Start, pause or complete a campaign from its page.
pub async fn campaign_transition(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Page {
    let form = action_form(&body);
    let s = acting(&app, &headers, &form.csrf).await?;
    let id = parse_uuid(&id, "campaign")?;
    let Some(transition) = Transition::parse(&action) else {
        return Err(error_page(StatusCode::NOT_FOUND, "No such action."));
    };
    reads::transition(&app, &s.context(), id, transition)
        .await
        .map_err(app_error)?;
    Ok(Redirect::to(&format!("/console/campaigns/{id}?done={action}")).into_response())
}

/// Contacts newest first, searched by name, company, domain or email (`GET /v1/contacts?q=`).
pub async fn contacts(State(app): State<App>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Page {
    let s = session(&app, &headers).await?;
    let q = query(raw)?;
    let after = time_cursor(q.cursor.as_deref())?;
    let text = q.q.clone().unwrap_or_default();
    let mut rows = reads::contacts(&app, Some(&text), after, PAGE + 1)
        .await
        .map_err(app_error)?;
    let next = cut(&mut rows, PAGE, |c| (c.created_at, c.id));
    let now = Utc::now();
    Ok(render(
        "Contacts",
        &s,
        "contacts",
        html! {
            h1 { "Contacts" }
            (notice(q.done.as_deref()))
            form.search method="get" action="/console/contacts" role="search" {
                label for="q" { "Search" }
                input #q type="search" name="q" value=(text) maxlength="200" placeholder="Name, company, domain or email";
                button type="submit" { "Search" }
            }
            @if rows.is_empty() {
                p.muted { "No contact matches." }
            } @else {
                div.scroll {
                    table.list {
                        thead { tr { th { "Email" } th { "Name" } th { "Company" } th { "Enriched" } th { "Created" } } }
                        tbody {
                            @for c in &rows {
                                tr data-contact=(c.id) {
                                    td { a href=(format!("/console/contacts/{}", c.id)) { (c.email) } }
                                    td { (name(c.first_name.as_deref(), c.last_name.as_deref())) }
                                    td { (c.company.clone().unwrap_or_default()) }
                                    td { (if c.enrichment.is_some() { "yes" } else { "—" }) }
                                    td { (time(c.created_at, now)) }
                                }
                            }
                        }
                    }
                }
            }
            (next_link("/console/contacts", "cursor", next, &[("q", &text)]))
        },
    ))
}

fn name(first: Option<&str>, last: Option<&str>) -> String {
    [first, last]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A contact: profile and custom fields from its stream, enrichment, enrollments, history.
pub async fn contact(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Page {
    let s = session(&app, &headers).await?;
    let q = query(raw)?;
    let id = parse_uuid(&id, "contact")?;
    let (loaded, history, enrollments) = reads::contact(&app, id, 50, PAGE)
        .await
        .map_err(app_error)?;
    let suppression = suppressions::of_contact_id(&app, id)
        .await
        .map_err(app_error)?;
    let c = &loaded.aggregate;
    let now = Utc::now();
    let email = c
        .email
        .as_ref()
        .map(|e| e.as_str().to_string())
        .unwrap_or_default();
    let fields: Vec<(&str, Option<String>)> = vec![
        (
            "First name",
            c.first_name.as_ref().map(|v| v.as_str().to_string()),
        ),
        (
            "Last name",
            c.last_name.as_ref().map(|v| v.as_str().to_string()),
        ),
        (
            "Company",
            c.company.as_ref().map(|v| v.as_str().to_string()),
        ),
        (
            "Company domain",
            c.company_domain.as_ref().map(|v| v.as_str().to_string()),
        ),
        ("Title", c.title.as_ref().map(|v| v.as_str().to_string())),
        ("Phone", c.phone.as_ref().map(|v| v.as_str().to_string())),
        (
            "LinkedIn",
            c.linkedin_url.as_ref().map(|v| v.as_str().to_string()),
        ),
    ];
    let custom = serde_json::to_value(&c.custom).unwrap_or_default();
    Ok(render(
        &email,
        &s,
        "contacts",
        html! {
            p.crumbs { a href="/console/contacts" { "Contacts" } " /" }
            (notice(q.done.as_deref()))
            h1.mono { (email) }
            p.small.muted { "Created " (maybe_time(c.created_at, now)) " · updated " (maybe_time(c.updated_at, now)) " · version " (loaded.version) }
            div.grid {
                section.panel {
                    h2 { "Profile" }
                    dl.fields {
                        @for (label, value) in &fields {
                            dt { (label) }
                            dd { @match value { Some(v) => (v), None => span.muted { "—" } } }
                        }
                        @if let Some(map) = custom.as_object() {
                            @for (k, v) in map {
                                dt { (k) }
                                dd { (v.as_str().unwrap_or_default()) }
                            }
                        }
                    }
                }
                section.panel {
                    h2 { "Enrichment" }
                    @match &c.enrichment {
                        None => p.muted { "Not enriched." },
                        Some(e) => {
                            p.small { "Quality " strong { (format!("{:.2}", e.quality_score.value())) }
                                " · sources " (e.sources.join(", ")) " · " (time(e.enriched_at, now)) }
                            pre.data { (serde_json::to_string_pretty(&e.data).unwrap_or_default()) }
                        }
                    }
                }
                section.panel {
                    h2 { "Enrollments" }
                    @if enrollments.is_empty() {
                        p.muted { "Not enrolled in any campaign." }
                    } @else {
                        ul.plain {
                            @for e in &enrollments {
                                li {
                                    a href=(format!("/console/campaigns/{}", e.campaign_id)) { "campaign " span.mono { (short(e.campaign_id)) } }
                                    " " (badge(&e.status)) " " (time(e.enrolled_at, now))
                                }
                            }
                        }
                    }
                }
                section.panel {
                    h2 { "History" }
                    ol.timeline {
                        @for h in &history {
                            li { span.mono { "#" (h.sequence) } " " (h.event_type)
                                @if let Some(a) = &h.actor { " " span.muted { "by " (a) } } }
                        }
                    }
                }
                section.panel #privacy {
                    h2 { "Privacy" }
                    dl.fields {
                        dt { "Consent" }
                        dd { @match &c.consent {
                            None => span.muted { "not recorded" },
                            Some(consent) => {
                                (format!("{:?}", consent.status).to_lowercase())
                                @if let Some(basis) = &consent.basis { " (" (format!("{basis:?}").to_lowercase()) ")" }
                                " · " (time(consent.recorded_at, now))
                            }
                        } }
                        dt { "Suppressed" }
                        dd { @match &suppression {
                            None => span.muted { "no" },
                            Some(entry) => { "yes, " (entry.reason) " · " (time(entry.created_at, now)) }
                        } }
                    }
                    div.actions {
                        @if suppression.is_none() {
                            form method="post" action=(format!("/console/contacts/{id}/suppress")) {
                                (csrf_field(&s))
                                button type="submit" data-action="suppress" { "Suppress" }
                            }
                        }
                        form method="post" action=(format!("/console/contacts/{id}/erase")) {
                            (csrf_field(&s))
                            label.small { input type="checkbox" name="confirm" value="erase" required; " Erasing cannot be undone" }
                            " "
                            button.danger type="submit" data-action="erase" { "Erase" }
                        }
                        @if !s.can_act() { span.small.muted { "(a read key cannot act)" } }
                    }
                }
            }
        },
    ))
}

#[derive(Debug, Default, Deserialize)]
pub struct PrivacyForm {
    #[serde(default)]
    csrf: String,
    /// `erase`: the box saying erasing cannot be undone, ticked.
    #[serde(default)]
    confirm: String,
}

/// Suppresses or erases a contact from its page (`POST /v1/suppressions`,
/// `DELETE /v1/contacts/{id}`).
pub async fn contact_action(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Page {
    let form: PrivacyForm = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let s = acting(&app, &headers, &form.csrf).await?;
    let id = parse_uuid(&id, "contact")?;
    match action.as_str() {
        "erase" => {
            if form.confirm != "erase" {
                return Err(error_page(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Nothing was erased: tick the box saying erasing cannot be undone.",
                ));
            }
            privacy::erase(&app, &s.context(), id)
                .await
                .map_err(app_error)?;
            Ok(Redirect::to("/console/contacts?done=erased").into_response())
        }
        "suppress" => {
            let (loaded, _, _) = reads::contact(&app, id, 1, 1).await.map_err(app_error)?;
            let email = loaded
                .aggregate
                .email
                .as_ref()
                .map(|e| e.as_str().to_string())
                .unwrap_or_default();
            suppressions::add(&app, &email, Some("manual"))
                .await
                .map_err(app_error)?;
            Ok(Redirect::to(&format!("/console/contacts/{id}?done=suppressed")).into_response())
        }
        _ => Err(error_page(StatusCode::NOT_FOUND, "No such action.")),
    }
}

/// Webhook sources with their counts, parked events and dead letters (with a retry).
pub async fn webhooks(State(app): State<App>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Page {
    let s = session(&app, &headers).await?;
    let q = query(raw)?;
    let sources_after: Option<String> = super::decode_cursor(q.sources.as_deref())?;
    let parked_after = time_cursor(q.parked.as_deref())?;
    let dead_after = time_cursor(q.dead.as_deref())?;
    let db = |e: sqlx::Error| app_error(e.into());
    let mut sources = sources::list_sources(&app.pool, sources_after, PAGE + 1)
        .await
        .map_err(db)?;
    let next_sources = cut(&mut sources, PAGE, |s| s.name.clone());
    let mut parked = webhooks::list_parked(&app.pool, false, parked_after, PAGE + 1)
        .await
        .map_err(db)?;
    let next_parked = cut(&mut parked, PAGE, |p| (p.received_at, p.id));
    let mut dead = webhooks::list_parked(&app.pool, true, dead_after, PAGE + 1)
        .await
        .map_err(db)?;
    let next_dead = cut(&mut dead, PAGE, |p| {
        (p.dead_lettered_at.unwrap_or(p.received_at), p.id)
    });
    let now = Utc::now();
    Ok(render(
        "Webhooks",
        &s,
        "webhooks",
        html! {
            h1 { "Webhooks" }
            (notice(q.done.as_deref()))
            section.panel {
                h2 { "Sources" }
                @if sources.is_empty() { p.muted { "No webhook source yet." } } @else {
                    div.scroll {
                        table.list {
                            thead { tr { th { "Source" } th { "Kind" } th.num { "Applied" } th.num { "Duplicate" } th.num { "Parked" } th.num { "Rejected" } th.num { "Ignored" } th { "Last delivery" } } }
                            tbody {
                                @for src in &sources {
                                    tr data-source=(src.name) {
                                        td.mono { (src.name) }
                                        td { (src.kind) }
                                        td.num { (count(src.counts.applied)) }
                                        td.num { (count(src.counts.duplicate)) }
                                        td.num { (count(src.counts.parked)) }
                                        td.num { (count(src.counts.rejected)) }
                                        td.num { (count(src.counts.ignored)) }
                                        td { (maybe_time(src.last_delivery_at, now)) }
                                    }
                                }
                            }
                        }
                    }
                }
                (next_link("/console/webhooks", "sources", next_sources, &[]))
            }
            section.panel {
                h2 { "Parked events" }
                p.small.muted { "Events for an enrollment that does not exist yet; applied when it does, retried meanwhile." }
                @if parked.is_empty() { p.muted #no-parked { "Nothing parked." } } @else {
                    div.scroll {
                        table.list #parked {
                            thead { tr { th { "Source" } th { "Type" } th { "Enrollment" } th.num { "Attempts" } th { "Next attempt" } th { "Received" } } }
                            tbody {
                                @for p in &parked {
                                    tr data-parked=(p.id) {
                                        td.mono { (p.source) }
                                        td { (p.kind) }
                                        td.mono { (short(p.enrollment_id)) }
                                        td.num { (p.attempts) }
                                        td { (time(p.next_attempt_at, now)) }
                                        td { (time(p.received_at, now)) }
                                    }
                                }
                            }
                        }
                    }
                }
                (next_link("/console/webhooks", "parked", next_parked, &[]))
            }
            section.panel {
                h2 { "Dead letters" }
                @if dead.is_empty() { p.muted #no-dead-letters { "No dead letter." } } @else {
                    div.scroll {
                        table.list #dead-letters {
                            thead { tr { th { "Source" } th { "Type" } th { "Why" } th { "Dead since" } th { "" } } }
                            tbody {
                                @for p in &dead {
                                    tr data-dead-letter=(p.id) {
                                        td.mono { (p.source) }
                                        td { (p.kind) }
                                        td.small { (p.last_error.clone().unwrap_or_default()) }
                                        td { (maybe_time(p.dead_lettered_at, now)) }
                                        td {
                                            form method="post" action=(format!("/console/webhooks/dead-letters/{}/retry", p.id)) {
                                                (csrf_field(&s))
                                                button type="submit" data-action="retry" { "Retry" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                (next_link("/console/webhooks", "dead", next_dead, &[]))
            }
        },
    ))
}

/// Puts a dead letter back in the queue (`POST /v1/webhooks/dead-letters/{id}/retry`).
pub async fn retry_dead_letter(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Page {
    let form = action_form(&body);
    let s = acting(&app, &headers, &form.csrf).await?;
    let id = parse_uuid(&id, "dead letter")?;
    webhooks::requeue_dead_letter(&app, &s.context(), id)
        .await
        .map_err(app_error)?;
    Ok(Redirect::to("/console/webhooks?done=retried").into_response())
}

/// Budgets with spent / reserved / limit, and the cost report by day, model and category.
pub async fn budgets(State(app): State<App>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Page {
    let s = session(&app, &headers).await?;
    let q = query(raw)?;
    let after: Option<i64> = super::decode_cursor(q.cursor.as_deref())?;
    let now = Utc::now();
    let mut rows = reads::budgets(&app, after, PAGE + 1, now)
        .await
        .map_err(app_error)?;
    let next = cut(&mut rows, PAGE, |(position, _)| *position);
    let budgets: Vec<reads::BudgetView> = rows.into_iter().map(|(_, b)| b).collect();
    let today = now.date_naive();
    let mut conn = app.pool.acquire().await.map_err(|e| app_error(e.into()))?;
    let report = async |conn: &mut sqlx::PgConnection, group_by| {
        let params = CostsParams {
            days: DAYS,
            group_by,
        };
        analytics::cost_report(conn, params, today)
            .await
            .map_err(|e| app_error(e.into()))
    };
    let by_day = report(&mut conn, GroupBy::Day).await?;
    let by_model = report(&mut conn, GroupBy::Model).await?;
    let by_category = report(&mut conn, GroupBy::Category).await?;
    drop(conn);
    let labels: Vec<String> = by_day
        .items
        .iter()
        .map(|i| {
            i.day
                .map(|d| d.format("%b %d").to_string())
                .unwrap_or_default()
        })
        .collect();
    let values: Vec<f64> = by_day
        .items
        .iter()
        .map(|i| i.cost.parse::<f64>().unwrap_or(0.0))
        .collect();
    let total: f64 = values.iter().sum();
    Ok(render(
        "Budgets & costs",
        &s,
        "budgets",
        html! {
            h1 { "Budgets & costs" }
            section.panel {
                h2 { "Budgets" }
                p.small.muted { "Spent and reserved in the current period; " span.key.spent {} " spent " span.key.reserved {} " reserved " span.key.over {} " past the limit." }
                (budget_rows(&budgets))
                (next_link("/console/budgets", "cursor", next, &[]))
            }
            section.panel {
                h2 { "Cost by day, last " (DAYS) " days (UTC)" }
                p.small { "Total " strong data-metric="costs.total" { (money(&format!("{total:.2}"))) } " from " (by_day.from) " to " (by_day.to) }
                (charts::columns(&labels, &values, "Cost per day"))
            }
            div.grid {
                section.panel { h2 { "By model" } (cost_table(&by_model.items, "Model")) }
                section.panel { h2 { "By category" } (cost_table(&by_category.items, "Category")) }
            }
        },
    ))
}

fn cost_table(items: &[analytics::CostItem], what: &str) -> Markup {
    html! {
        @if items.is_empty() { p.muted { "No cost recorded." } } @else {
            div.scroll { table.list {
                thead { tr { th { (what) } th.num { "Cost" } th.num { "Requests" } th.num { "Tokens in / out" } } }
                tbody {
                    @for i in items {
                        tr {
                            td { @let k = i.key(); @if k.is_empty() { span.muted { "(none)" } } @else { (k) } }
                            td.num { (money(&i.cost)) }
                            td.num { (count(i.requests)) }
                            td.num { (count(i.input_tokens)) " / " (count(i.output_tokens)) }
                        }
                    }
                }
            } }
        }
    }
}

/// Projections with their checkpoint and lag, a rebuild in progress, the feed horizon.
pub async fn operations(State(app): State<App>, headers: HeaderMap) -> Page {
    let s = session(&app, &headers).await?;
    let (status, rebuild, horizon) = reads::operations(&app)
        .await
        .map_err(|e| app_error(e.into()))?;
    let subscriptions = crate::app::subscriptions::list(&app, None, PAGE)
        .await
        .map_err(app_error)?;
    let now = Utc::now();
    Ok(render(
        "Operations",
        &s,
        "operations",
        html! {
            h1 { "Operations" }
            section.panel {
                h2 { "Projections" }
                div.scroll {
                    table.list {
                        thead { tr { th { "Projection" } th { "State" } th.num { "Behind" } th { "Checkpoint" } th { "Held by" } } }
                        tbody {
                            @for p in &status {
                                tr data-projection=(p.name) {
                                    td.mono { (p.name) }
                                    td { (badge(p.state)) }
                                    td.num data-metric="behind" { (count(p.behind)) }
                                    td.mono { (p.checkpoint) }
                                    td.small { (p.held_by.clone().unwrap_or_else(|| "—".into())) }
                                }
                                @if let Some(err) = &p.failed_error {
                                    tr.failure { td colspan="5" { "Failed at position " (p.failed_position.unwrap_or_default()) ": " (err) } }
                                }
                            }
                        }
                    }
                }
            }
            div.grid {
                section.panel {
                    h2 { "Rebuild" }
                    @match &rebuild {
                        None => p.muted { "No rebuild in progress." },
                        Some(r) => p {
                            (r.projections.join(", ")) ": " (count(r.events)) " events read, at " span.mono { (r.position) }
                            br; "started " (time(r.started_at, now)) ", last batch " (time(r.updated_at, now))
                        },
                    }
                }
                section.panel {
                    h2 { "Event feed" }
                    p { "Head: " span.mono { (horizon.head.clone().unwrap_or_else(|| "empty".into())) } }
                    p {
                        "Horizon: "
                        @match horizon.held_for_secs {
                            Some(secs) => { "held back by a transaction open for " strong { (duration(secs)) } }
                            None => { "no transaction holds it back" }
                        }
                    }
                }
                section.panel #subscriptions {
                    h2 { "Subscriptions" }
                    @if subscriptions.is_empty() { p.muted { "No subscription." } } @else {
                        div.scroll { table.list {
                            thead { tr { th { "URL" } th { "Status" } th { "Breaker" } th.num { "Backlog" } th { "Last success" } th { "Last failure" } } }
                            tbody {
                                @for sub in &subscriptions {
                                    tr data-subscription=(sub.id) {
                                        td.mono { (sub.url) }
                                        td { (badge(&sub.status))
                                            @if let Some(reason) = &sub.disabled_reason { " " span.small.muted { (reason) } } }
                                        td { (badge(&sub.breaker)) }
                                        td.num { (count(sub.backlog)) }
                                        td { (maybe_time(sub.last_success_at, now)) }
                                        td { (maybe_time(sub.last_failure_at, now)) }
                                    }
                                }
                            }
                        } }
                        @if subscriptions.len() as i64 >= PAGE { p.small.muted { "The first " (PAGE) "; the rest through GET /v1/subscriptions." } }
                    }
                }
            }
        },
    ))
}

#[derive(Debug, Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    csrf: String,
}

fn sign_in_form(token: &str, message: Option<&str>) -> Markup {
    page_shell(
        "Sign in",
        None,
        "",
        html! {
            section.panel.signin {
                h1 { "Sign in" }
                p { "Sign in with an API key (" code { "leadledger keys create" } "). Read keys can look; write keys can also act." }
                @if let Some(m) = message { p.alert role="alert" { (m) } }
                form method="post" action="/console/sign-in" {
                    input type="hidden" name="csrf" value=(token);
                    label for="key" { "API key" }
                    input #key type="password" name="key" autocomplete="current-password" required placeholder="ll_…";
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

pub async fn sign_in_page(
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let (token, cookie) = signin::fresh(&headers);
    let message = q
        .contains_key("expired")
        .then_some("That key is no longer valid; sign in again.");
    (
        [(header::SET_COOKIE, cookie)],
        sign_in_form(&token, message),
    )
        .into_response()
}

pub async fn sign_in(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let form: SignInForm = serde_urlencoded::from_bytes(&body).unwrap_or(SignInForm {
        key: String::new(),
        csrf: String::new(),
    });
    if !signin::valid(&headers, &form.csrf) {
        let (token, cookie) = signin::fresh(&headers);
        return (
            StatusCode::FORBIDDEN,
            [(header::SET_COOKIE, cookie)],
            sign_in_form(
                &token,
                Some("This form expired or did not come from this console; try again."),
            ),
        )
            .into_response();
    }
    let key = form.key.trim();
    // Only what a key can be reaches the database or a cookie.
    let plausible = !key.is_empty()
        && key.len() <= 200
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let found = if plausible {
        match crate::app::keys::lookup(&app.pool, key).await {
            Ok(found) => found,
            Err(e) => return app_error(e),
        }
    } else {
        None
    };
    if found.is_none() {
        let (token, cookie) = signin::fresh(&headers);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::SET_COOKIE, cookie)],
            sign_in_form(&token, Some("That is not a valid API key.")),
        )
            .into_response();
    }
    let [session, cleared] = signin::signed_in(key, &headers);
    let mut response = Redirect::to("/console").into_response();
    response.headers_mut().append(header::SET_COOKIE, session);
    response.headers_mut().append(header::SET_COOKIE, cleared);
    response
}

pub async fn sign_out(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let form = action_form(&body);
    // Signing out needs the session's token (so no other page can sign a person out), but
    // not a write key.
    match session(&app, &headers).await {
        Ok(s) if super::same(&form.csrf, &s.csrf) => {}
        Ok(_) => {
            return error_page(
                StatusCode::FORBIDDEN,
                "This form did not come from this console (its CSRF token is missing or wrong).",
            );
        }
        Err(_) => {}
    }
    (
        [(header::SET_COOKIE, signin::signed_out(&headers))],
        Redirect::to("/console/sign-in"),
    )
        .into_response()
}
