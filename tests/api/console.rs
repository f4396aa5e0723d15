//! The web console: sign-in and its cookie, CSRF tokens, scopes and the
//! Content-Security-Policy over plain HTTP; then a real headless Chromium (driven over
//! WebDriver by chromedriver) signing in, comparing the pages' numbers with the API's,
//! acting from the pages, and saving a screenshot of each page at 1440 and 390 px wide
//! under `target/console-screenshots/`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};
use crate::rebuild::settle;
use crate::webhooks::{deliver, event, source};

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of cookie `name` among a response's `Set-Cookie` headers, with the whole
/// header.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<(String, String)> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            let value = v[name.len() + 1..].split(';').next().unwrap().to_string();
            (value, v.to_string())
        })
}

/// The `csrf` hidden field of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

/// A signed-in session over plain HTTP: its cookie header and its CSRF token.
struct Signed {
    cookie: String,
    csrf: String,
}

async fn sign_in(
    app: &TestApp,
    key: &str,
    headers: &[(&str, &str)],
) -> (reqwest::Response, Option<Signed>) {
    let client = no_redirects();
    let page = client
        .get(app.url("/console/sign-in"))
        .send()
        .await
        .unwrap();
    let (token_cookie, _) = set_cookie(&page, "ll_console_signin").expect("a sign-in cookie");
    let token = csrf_of(&page.text().await.unwrap());
    let mut request = client
        .post(app.url("/console/sign-in"))
        .header("cookie", format!("ll_console_signin={token_cookie}"))
        .form(&[("key", key), ("csrf", &token)]);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let Some((session, _)) = set_cookie(&response, "ll_console") else {
        return (response, None);
    };
    let cookie = format!("ll_console={session}");
    let overview = client
        .get(app.url("/console"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    let csrf = csrf_of(&overview.text().await.unwrap());
    (response, Some(Signed { cookie, csrf }))
}

async fn get(app: &TestApp, s: &Signed, path: &str) -> reqwest::Response {
    no_redirects()
        .get(app.url(path))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap()
}

async fn post_form(
    app: &TestApp,
    cookie: &str,
    path: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    no_redirects()
        .post(app.url(path))
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap()
}

async fn campaign_status(app: &TestApp, id: &str) -> String {
    let c: Value = app
        .read(&format!("/v1/campaigns/{id}"))
        .await
        .json()
        .await
        .unwrap();
    c["status"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_root_leads_to_the_console_and_a_page_without_a_session_to_sign_in() {
    let app = spawn_app().await;
    let root = no_redirects().get(app.url("/")).send().await.unwrap();
    assert_eq!(root.status(), 308);
    assert_eq!(root.headers()["location"], "/console");
    let console = no_redirects()
        .get(app.url("/console/campaigns"))
        .send()
        .await
        .unwrap();
    assert_eq!(console.status(), 303);
    assert_eq!(console.headers()["location"], "/console/sign-in");
    let page = no_redirects()
        .get(app.url("/console/sign-in"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-security-policy"], CSP);
    assert!(page.text().await.unwrap().contains("Sign in"));
    // A made-up session is no session.
    let forged = no_redirects()
        .get(app.url("/console"))
        .header("cookie", "ll_console=ll_not-a-key")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 303);
    assert!(
        forged.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/console/sign-in")
    );
}

#[tokio::test]
async fn signing_in_keeps_the_key_in_an_httponly_strict_cookie_secure_behind_tls() {
    let app = spawn_app().await;
    let (response, signed) = sign_in(&app, &app.read_key, &[]).await;
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/console");
    let (_, header) = set_cookie(&response, "ll_console").unwrap();
    assert!(header.contains("HttpOnly"), "{header}");
    assert!(header.contains("SameSite=Strict"), "{header}");
    assert!(header.contains("Path=/console"), "{header}");
    assert!(!header.contains("Secure"), "plain HTTP: {header}");
    assert!(signed.is_some());
    let (response, _) = sign_in(&app, &app.read_key, &[("x-forwarded-proto", "https")]).await;
    let (_, header) = set_cookie(&response, "ll_console").unwrap();
    assert!(header.contains("; Secure"), "{header}");
}

#[tokio::test]
async fn a_wrong_key_or_a_sign_in_form_from_elsewhere_signs_nobody_in() {
    let app = spawn_app().await;
    let (response, signed) = sign_in(&app, "ll_wrong", &[]).await;
    assert_eq!(response.status(), 401);
    assert!(signed.is_none());
    // A form posted without the token its cookie carries (another site's form).
    let response = no_redirects()
        .post(app.url("/console/sign-in"))
        .form(&[("key", app.write_key.as_str()), ("csrf", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(set_cookie(&response, "ll_console").is_none());
}

#[tokio::test]
async fn every_page_carries_the_strict_policy_and_renders_for_a_signed_in_key() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("Launch").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let contact: Value = app
        .post(
            "/v1/contacts",
            &json!({"email": "ada@example.com", "first_name": "Ada"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let contact = contact["id"].as_str().unwrap().to_string();
    settle(&app.pool).await;
    let (_, s) = sign_in(&app, &app.read_key, &[]).await;
    let s = s.unwrap();
    for path in [
        "/console".to_string(),
        "/console/campaigns".into(),
        format!("/console/campaigns/{campaign}"),
        "/console/contacts?q=ada".into(),
        format!("/console/contacts/{contact}"),
        "/console/webhooks".into(),
        "/console/budgets".into(),
        "/console/operations".into(),
    ] {
        let response = get(&app, &s, &path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-security-policy"], CSP, "{path}");
        assert_eq!(response.headers()["cache-control"], "no-store", "{path}");
        let html = response.text().await.unwrap();
        assert!(!html.contains("<script"), "{path}");
        for attribute in ["src=\"", "href=\"", "action=\""] {
            for other in ["http:", "https:", "//"] {
                let at = format!("{attribute}{other}");
                assert!(!html.contains(&at), "{path} links another origin ({at})");
            }
        }
    }
    let search = get(&app, &s, "/console/contacts?q=ada")
        .await
        .text()
        .await
        .unwrap();
    assert!(search.contains("ada@example.com"));
    let miss = get(&app, &s, "/console/contacts?q=nobody")
        .await
        .text()
        .await
        .unwrap();
    assert!(!miss.contains("ada@example.com"));
}

#[tokio::test]
async fn bad_links_get_an_error_page_never_a_failure() {
    let app = spawn_app().await;
    let (_, s) = sign_in(&app, &app.read_key, &[]).await;
    let s = s.unwrap();
    for (path, status) in [
        ("/console/campaigns?status=lost", 400),
        ("/console/campaigns?cursor=%%%", 400),
        (
            "/console/campaigns?cursor=WyItNTAwMC0wMS0wMVQwMDowMDowMFoiLCIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDAiXQ",
            400,
        ),
        ("/console/campaigns?unknown=1", 400),
        ("/console/campaigns/not-a-uuid", 404),
        (
            "/console/campaigns/0190a7e4-0000-7000-8000-000000000000",
            404,
        ),
        (
            "/console/contacts/0190a7e4-0000-7000-8000-000000000000",
            404,
        ),
        ("/console/contacts?q=%00", 400),
        ("/console/nowhere", 404),
    ] {
        let response = get(&app, &s, path).await;
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_eq!(response.headers()["content-security-policy"], CSP, "{path}");
    }
}

#[tokio::test]
async fn an_action_without_its_csrf_token_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("Guarded").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, s) = sign_in(&app, &app.write_key, &[]).await;
    let s = s.unwrap();
    let path = format!("/console/campaigns/{campaign}/start");
    for form in [vec![], vec![("csrf", "forged")], vec![("csrf", "")]] {
        let response = post_form(&app, &s.cookie, &path, &form).await;
        assert_eq!(response.status(), 403, "{form:?}");
        assert!(response.text().await.unwrap().contains("CSRF"));
        assert_eq!(campaign_status(&app, &campaign).await, "draft");
    }
    // Another key's token is not this session's.
    let (_, other) = sign_in(&app, &app.admin_key, &[]).await;
    let response = post_form(&app, &s.cookie, &path, &[("csrf", &other.unwrap().csrf)]).await;
    assert_eq!(response.status(), 403);
    assert_eq!(campaign_status(&app, &campaign).await, "draft");
    // No session at all.
    let response = post_form(&app, "", &path, &[("csrf", &s.csrf)]).await;
    assert_eq!(response.status(), 401);
    assert_eq!(campaign_status(&app, &campaign).await, "draft");
    // The right token acts.
    let response = post_form(&app, &s.cookie, &path, &[("csrf", &s.csrf)]).await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"].to_str().unwrap(),
        format!("/console/campaigns/{campaign}?done=start")
    );
    assert_eq!(campaign_status(&app, &campaign).await, "running");
    // A transition its status does not allow is a conflict page, nothing written.
    let complete = format!("/console/campaigns/{campaign}/complete");
    let response = post_form(&app, &s.cookie, &complete, &[("csrf", &s.csrf)]).await;
    assert_eq!(response.status(), 303);
    let response = post_form(&app, &s.cookie, &path, &[("csrf", &s.csrf)]).await;
    assert_eq!(response.status(), 409);
    assert_eq!(campaign_status(&app, &campaign).await, "completed");
}

#[tokio::test]
async fn a_read_key_can_look_but_not_act() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("Look only").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, s) = sign_in(&app, &app.read_key, &[]).await;
    let s = s.unwrap();
    assert_eq!(
        get(&app, &s, &format!("/console/campaigns/{campaign}"))
            .await
            .status(),
        200
    );
    let response = post_form(
        &app,
        &s.cookie,
        &format!("/console/campaigns/{campaign}/start"),
        &[("csrf", &s.csrf)],
    )
    .await;
    assert_eq!(response.status(), 403);
    assert!(response.text().await.unwrap().contains("read key"));
    assert_eq!(campaign_status(&app, &campaign).await, "draft");
    let letter = uuid::Uuid::now_v7();
    dead_letter(&app, letter).await;
    let response = post_form(
        &app,
        &s.cookie,
        &format!("/console/webhooks/dead-letters/{letter}/retry"),
        &[("csrf", &s.csrf)],
    )
    .await;
    assert_eq!(response.status(), 403);
    assert_eq!(dead_letters(&app).await, 1);
}

#[tokio::test]
async fn signing_out_takes_the_sessions_token_and_ends_the_session() {
    let app = spawn_app().await;
    let (_, s) = sign_in(&app, &app.read_key, &[]).await;
    let s = s.unwrap();
    let refused = post_form(&app, &s.cookie, "/console/sign-out", &[("csrf", "forged")]).await;
    assert_eq!(refused.status(), 403);
    let response = post_form(&app, &s.cookie, "/console/sign-out", &[("csrf", &s.csrf)]).await;
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/console/sign-in");
    let (value, header) = set_cookie(&response, "ll_console").unwrap();
    assert_eq!(value, "");
    assert!(
        header.contains("Max-Age=0") && header.contains("HttpOnly"),
        "{header}"
    );
    // A revoked key's cookie signs nobody in either.
    let (_, s) = sign_in(&app, &app.read_key, &[]).await;
    let s = s.unwrap();
    // Revoked as `leadledger keys revoke` does: every process hears of it at once.
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM api_keys")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    for id in ids {
        leadledger::app::keys::revoke_key(&app.pool, id)
            .await
            .unwrap();
    }
    // Within the second a process may keep a key it looked up.
    let mut status = 0;
    for _ in 0..50 {
        status = get(&app, &s, "/console").await.status().as_u16();
        if status == 303 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(status, 303);
}

/// Puts a dead letter for an enrollment that does not exist into the queue.
async fn dead_letter(app: &TestApp, id: uuid::Uuid) {
    sqlx::query(
        "INSERT INTO webhook_parked (id, source, event_id, enrollment_id, kind, occurred_at,
                                     next_attempt_at, attempts, last_error, dead_lettered_at)
         VALUES ($1, 'esp', $2, $3, 'opened', now() - interval '2 hours', now(), 9,
                 'no enrollment after 9 attempts', now() - interval '1 hour')",
    )
    .bind(id)
    .bind(format!("ev-{id}"))
    .bind(uuid::Uuid::now_v7())
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn dead_letters(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_parked WHERE dead_lettered_at IS NOT NULL")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

// ---------------------------------------------------------------- the real browser

mod browser {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use fantoccini::wd::WebDriverCompatibleCommand;
    use fantoccini::{Client, ClientBuilder, Locator};
    use serde_json::{Value, json};

    /// A chromedriver started for one test, on a free port, with a headless Chromium
    /// session that never reaches beyond this machine; both end when this is dropped.
    pub struct Browser {
        pub client: Client,
        driver: Child,
        _profile: tempfile::TempDir,
    }

    fn chromium() -> &'static str {
        [
            "/usr/bin/chromium",
            "/usr/bin/chromium-browser",
            "/usr/bin/google-chrome",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Chromium is installed (apt-get install chromium chromium-driver; .ci/run does it)")
    }

    impl Browser {
        pub async fn start() -> Self {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            // In a process group of its own, so that the browser it starts ends with it.
            let driver = Command::new("chromedriver")
                .process_group(0)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect(
                    "chromedriver is installed (apt-get install chromium-driver; .ci/run does it)",
                );
            let profile = tempfile::tempdir().unwrap();
            let args = [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1440,1000",
            ]
            .into_iter()
            .map(str::to_string)
            .chain([format!("--user-data-dir={}", profile.path().display())])
            .collect::<Vec<_>>();
            let mut caps = serde_json::Map::new();
            caps.insert("browserName".into(), json!("chrome"));
            caps.insert(
                "goog:chromeOptions".into(),
                json!({"binary": chromium(), "args": args}),
            );
            caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
            let url = format!("http://127.0.0.1:{port}");
            let mut last = None;
            for _ in 0..300 {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                match ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&url)
                    .await
                {
                    Ok(client) => {
                        return Self {
                            client,
                            driver,
                            _profile: profile,
                        };
                    }
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no WebDriver session: {last:?}");
        }

        /// The browser's console messages since the last call.
        pub async fn console_log(&self) -> Vec<Value> {
            let log = self
                .client
                .issue_cmd(BrowserLog)
                .await
                .expect("browser log");
            log.as_array().cloned().unwrap_or_default()
        }

        pub async fn js(&self, script: &str) -> Value {
            self.client.execute(script, vec![]).await.expect(script)
        }

        pub async fn text(&self, css: &str) -> String {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("{css}: {e}"))
                .text()
                .await
                .unwrap()
        }

        pub async fn path(&self) -> String {
            let url = self.client.current_url().await.unwrap();
            match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            }
        }

        /// Waits (up to 10 s) for the page at `path` after a click started a navigation.
        pub async fn wait_for(&self, path: &str) {
            for _ in 0..200 {
                let ready = self.js("return document.readyState").await == "complete";
                if ready && self.path().await == path {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(self.path().await, path, "the page after the click");
        }

        pub async fn stop(self) {
            let _ = self.client.clone().close().await;
        }
    }

    impl Drop for Browser {
        /// Ends chromedriver and every browser process it started (its process group).
        fn drop(&mut self) {
            use nix::sys::signal::{Signal, killpg};
            use nix::unistd::Pid;
            let _ = killpg(Pid::from_raw(self.driver.id() as i32), Signal::SIGKILL);
            let _ = self.driver.wait();
        }
    }

    /// A DevTools command through chromedriver (`POST /session/{id}/goog/cdp/execute`).
    #[derive(Debug)]
    pub struct Cdp(pub &'static str, pub Value);

    impl WebDriverCompatibleCommand for Cdp {
        fn endpoint(
            &self,
            base: &url::Url,
            session: Option<&str>,
        ) -> Result<url::Url, url::ParseError> {
            base.join(&format!(
                "session/{}/goog/cdp/execute",
                session.unwrap_or_default()
            ))
        }

        fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
            let body = json!({"cmd": self.0, "params": self.1});
            (http::Method::POST, Some(body.to_string()))
        }
    }

    /// chromedriver's `POST /session/{id}/se/log` for the `browser` log.
    #[derive(Debug)]
    struct BrowserLog;

    impl WebDriverCompatibleCommand for BrowserLog {
        fn endpoint(
            &self,
            base: &url::Url,
            session: Option<&str>,
        ) -> Result<url::Url, url::ParseError> {
            base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
        }

        fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
            (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
        }
    }
}

/// A number as a page writes it (`1,234`, `3.35`), as the API does.
fn number(text: &str) -> String {
    text.trim().replace(',', "")
}

/// Screenshots of the page, its whole height, in a viewport 1440 and 390 px wide (the
/// latter as a phone); at 390 px the page must not scroll sideways.
async fn screenshots(b: &browser::Browser, name: &str) {
    use base64::Engine;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    for width in [1440_u32, 390] {
        let metrics =
            json!({"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600});
        b.client
            .issue_cmd(browser::Cdp("Emulation.setDeviceMetricsOverride", metrics))
            .await
            .unwrap();
        let height = b
            .js("return document.documentElement.scrollHeight")
            .await
            .as_u64()
            .unwrap_or(900)
            .clamp(300, 8000);
        let shot = b
            .client
            .issue_cmd(browser::Cdp(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}),
            ))
            .await
            .unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(dir.join(format!("{name}-{width}.png")), png).unwrap();
        if width == 390 {
            let wide = b
                .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
                .await
                .as_i64()
                .unwrap();
            assert!(wide <= 0, "{name} scrolls sideways by {wide} px at 390 px");
        }
    }
    b.client
        .issue_cmd(browser::Cdp(
            "Emulation.clearDeviceMetricsOverride",
            json!({}),
        ))
        .await
        .unwrap();
}

/// Every resource the page loaded came from the server itself.
async fn only_own_origin(b: &browser::Browser, app: &TestApp) {
    let names = b
        .js("return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name))")
        .await;
    for name in names.as_array().unwrap() {
        let name = name.as_str().unwrap();
        assert!(
            name.starts_with(&app.address),
            "a request to another origin: {name}"
        );
    }
}

/// Seeds a campaign with deliveries, a draft, a budget with spends and a dead letter;
/// returns (running campaign id, dead letter id, contact id).
async fn seed(app: &TestApp) -> (String, uuid::Uuid, String) {
    let hooks = source(app, "esp").await;
    let campaign = app.create_campaign("Spring launch").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = app
        .post(&format!("/v1/campaigns/{campaign}/start"), &json!({}))
        .await;
    assert_eq!(started.status(), 200);
    let mut contacts = Vec::new();
    for (i, email) in [
        "ada@example.com",
        "bob@example.com",
        "cy@example.com",
        "di@example.com",
    ]
    .iter()
    .enumerate()
    {
        let c: Value = app
            .post(
                "/v1/contacts",
                &json!({"email": email, "first_name": format!("N{i}"), "company": "Acme"}),
            )
            .await
            .json()
            .await
            .unwrap();
        contacts.push(c["id"].as_str().unwrap().to_string());
    }
    let enrolled = app
        .post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": contacts}),
        )
        .await;
    assert_eq!(enrolled.status(), 200);
    let now = chrono::Utc::now();
    let at = |h: i64| (now - chrono::Duration::hours(h)).to_rfc3339();
    deliver(
        &app.address,
        &hooks,
        "batch-1",
        &json!([
            event("e1", "delivered", &campaign, "ada@example.com", &at(50)),
            event("e2", "opened", &campaign, "ada@example.com", &at(49)),
            event("e3", "replied", &campaign, "ada@example.com", &at(2)),
            event("e4", "delivered", &campaign, "bob@example.com", &at(26)),
            event("e5", "clicked", &campaign, "bob@example.com", &at(25)),
            event("e6", "bounced", &campaign, "cy@example.com", &at(1)),
        ]),
    )
    .await;
    app.create_campaign("Autumn draft").await;
    let budget: Value = app
        .post(
            "/v1/budgets",
            &json!({"name": "AI enrichment", "limit": "250.00"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let budget = budget["id"].as_str().unwrap().to_string();
    for (amount, model) in [
        ("12.50", "gpt-4o"),
        ("3.75", "claude-3-5"),
        ("1200.00", "gpt-4o"),
    ] {
        let r = app
            .post(
                &format!("/v1/budgets/{budget}/spend"),
                &json!({"amount": amount, "category": "ai", "model": model}),
            )
            .await;
        // The last one goes past the limit and is refused, as the API says.
        assert!(
            r.status().is_success() || r.status() == 409,
            "{}",
            r.status()
        );
    }
    let letter = uuid::Uuid::now_v7();
    dead_letter(app, letter).await;
    settle(&app.pool).await;
    (campaign, letter, contacts[0].clone())
}

#[tokio::test]
async fn in_a_real_browser_the_console_shows_the_apis_numbers_and_acts() {
    let app = spawn_app().await;
    let (campaign, letter, contact) = seed(&app).await;
    let b = browser::Browser::start().await;

    // Sign in through the form.
    b.client.goto(&app.url("/console")).await.unwrap();
    assert_eq!(b.path().await, "/console/sign-in");
    screenshots(&b, "sign-in").await;
    b.client
        .find(fantoccini::Locator::Css("#key"))
        .await
        .unwrap()
        .send_keys(&app.write_key)
        .await
        .unwrap();
    b.client
        .find(fantoccini::Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("/console").await;

    // The overview's numbers are the dashboard's.
    let d: Value = app
        .read("/v1/analytics/dashboard")
        .await
        .json()
        .await
        .unwrap();
    let pairs = [
        ("contacts", d["contacts"].to_string()),
        ("campaigns", d["campaigns"]["total"].to_string()),
        ("enrollments", d["enrollments"].to_string()),
        (
            "spend",
            d["spend_this_month"]["cost"].as_str().unwrap().to_string(),
        ),
        ("campaigns.running", d["campaigns"]["running"].to_string()),
        ("campaigns.draft", d["campaigns"]["draft"].to_string()),
        (
            "milestones.delivered",
            d["milestones"]["delivered"].to_string(),
        ),
        ("milestones.opened", d["milestones"]["opened"].to_string()),
        ("milestones.replied", d["milestones"]["replied"].to_string()),
        ("milestones.bounced", d["milestones"]["bounced"].to_string()),
    ];
    for (metric, api) in &pairs {
        let shown = number(&b.text(&format!("[data-metric='{metric}']")).await);
        assert_eq!(&shown, api, "overview {metric}: page {shown}, API {api}");
    }
    assert_eq!(d["contacts"], 4);
    let top = b.text("[data-metric='reply_rate']").await;
    let top: f64 = top.trim_end_matches(" %").parse().unwrap();
    assert_eq!(top, d["top_campaigns"][0]["reply_rate"].as_f64().unwrap());
    only_own_origin(&b, &app).await;
    screenshots(&b, "overview").await;

    // Campaigns, then one campaign: funnel as /metrics says, and its chart.
    b.client.goto(&app.url("/console/campaigns")).await.unwrap();
    assert!(
        b.text(&format!("tr[data-campaign='{campaign}']"))
            .await
            .contains("Spring launch")
    );
    only_own_origin(&b, &app).await;
    screenshots(&b, "campaigns").await;
    b.client
        .find(fantoccini::Locator::LinkText("Spring launch"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for(&format!("/console/campaigns/{campaign}")).await;
    let m: Value = app
        .read(&format!("/v1/campaigns/{campaign}/metrics"))
        .await
        .json()
        .await
        .unwrap();
    for step in [
        "enrolled",
        "sent",
        "delivered",
        "opened",
        "clicked",
        "replied",
        "bounced",
    ] {
        let shown = number(&b.text(&format!("[data-metric='funnel.{step}']")).await);
        let api = m[step].to_string();
        assert_eq!(shown, api, "funnel {step}: page {shown}, API {api} ({m})");
    }
    let lines = b
        .js("return document.querySelectorAll('svg.chart polyline').length")
        .await;
    assert_eq!(lines, 5, "the chart draws five series");
    let bars = b
        .js("return document.querySelectorAll('.funnel svg.bar').length")
        .await;
    assert_eq!(bars, 6);
    // The enrollment filter.
    b.client
        .goto(&app.url(&format!("/console/campaigns/{campaign}?status=replied")))
        .await
        .unwrap();
    let rows = b
        .js("return document.querySelectorAll('tr[data-enrollment]').length")
        .await;
    assert_eq!(rows, m["replied"]);
    b.client
        .goto(&app.url(&format!("/console/campaigns/{campaign}")))
        .await
        .unwrap();
    only_own_origin(&b, &app).await;
    screenshots(&b, "campaign").await;

    // Contacts: search and a profile.
    b.client.goto(&app.url("/console/contacts")).await.unwrap();
    screenshots(&b, "contacts").await;
    b.client
        .find(fantoccini::Locator::Css("#q"))
        .await
        .unwrap()
        .send_keys("bob")
        .await
        .unwrap();
    b.client
        .find(fantoccini::Locator::Css("form.search button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("/console/contacts?q=bob").await;
    let found = b
        .js("return document.querySelectorAll('tr[data-contact]').length")
        .await;
    assert_eq!(found, 1);
    b.client
        .goto(&app.url(&format!("/console/contacts/{contact}")))
        .await
        .unwrap();
    assert_eq!(b.text("h1").await, "ada@example.com");
    only_own_origin(&b, &app).await;
    screenshots(&b, "contact").await;

    // Budgets and costs, operations.
    b.client.goto(&app.url("/console/budgets")).await.unwrap();
    let budgets: Value = app.read("/v1/budgets").await.json().await.unwrap();
    let spent = budgets["items"][0]["spent"].as_str().unwrap().to_string();
    assert_eq!(number(&b.text("[data-metric='budget.spent']").await), spent);
    only_own_origin(&b, &app).await;
    screenshots(&b, "budgets").await;
    b.client
        .goto(&app.url("/console/operations"))
        .await
        .unwrap();
    let projections = b
        .js("return document.querySelectorAll('tr[data-projection]').length")
        .await;
    assert!(projections.as_u64().unwrap() >= 5, "{projections}");
    screenshots(&b, "operations").await;

    // Retry the dead letter from the page: it leaves the list.
    b.client.goto(&app.url("/console/webhooks")).await.unwrap();
    screenshots(&b, "webhooks").await;
    b.client
        .find(fantoccini::Locator::Css(&format!(
            "tr[data-dead-letter='{letter}'] button"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("/console/webhooks?done=retried").await;
    let left = b
        .js(&format!(
            "return document.querySelectorAll(\"tr[data-dead-letter='{letter}']\").length"
        ))
        .await;
    assert_eq!(left, 0, "the retried dead letter is still listed");
    assert!(b.text("p.notice").await.contains("put back"));
    assert_eq!(dead_letters(&app).await, 0);
    let api: Value = app
        .read("/v1/webhooks/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(api["items"].as_array().unwrap().len(), 0);

    // Nothing went wrong in the browser so far.
    let errors: Vec<Value> = b
        .console_log()
        .await
        .into_iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .collect();
    assert!(errors.is_empty(), "console messages: {errors:#?}");

    // Sign out; sign in with a read key: it may look, not act.
    b.client
        .find(fantoccini::Locator::Css("form.signout button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("/console/sign-in").await;
    b.client.goto(&app.url("/console")).await.unwrap();
    assert_eq!(b.path().await, "/console/sign-in", "signed out");
    b.client
        .find(fantoccini::Locator::Css("#key"))
        .await
        .unwrap()
        .send_keys(&app.read_key)
        .await
        .unwrap();
    b.client
        .find(fantoccini::Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("/console").await;
    b.client
        .goto(&app.url(&format!("/console/campaigns/{campaign}")))
        .await
        .unwrap();
    b.client
        .find(fantoccini::Locator::Css("button[data-action='pause']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for(&format!("/console/campaigns/{campaign}/pause"))
        .await;
    assert!(b.text("[data-error]").await.contains("read key"));
    assert_eq!(campaign_status(&app, &campaign).await, "running");
    screenshots(&b, "refused").await;
    // The refusal's 403 is the only thing the browser reports.
    let errors: Vec<Value> = b
        .console_log()
        .await
        .into_iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .filter(|e| {
            !e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("status of 403")
        })
        .collect();
    assert!(errors.is_empty(), "console messages: {errors:#?}");
    b.stop().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_write_key_suppresses_and_erases_a_contact_from_its_page_and_a_read_key_cannot() {
    let app = spawn_app().await;
    let contact: Value = app
        .post(
            "/v1/contacts",
            &json!({"email": "erase.me@example.com", "first_name": "Erin"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = contact["id"].as_str().unwrap().to_string();
    let erase = format!("/console/contacts/{id}/erase");
    let (_, reader) = sign_in(&app, &app.read_key, &[]).await;
    let reader = reader.unwrap();
    let refused = post_form(
        &app,
        &reader.cookie,
        &erase,
        &[("csrf", &reader.csrf), ("confirm", "erase")],
    )
    .await;
    assert_eq!(refused.status(), 403);
    let (_, writer) = sign_in(&app, &app.write_key, &[]).await;
    let writer = writer.unwrap();
    let page = get(&app, &writer, &format!("/console/contacts/{id}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("id=\"privacy\"") && page.contains("data-action=\"erase\""),
        "the contact page has its privacy panel"
    );
    let suppressed = post_form(
        &app,
        &writer.cookie,
        &format!("/console/contacts/{id}/suppress"),
        &[("csrf", &writer.csrf)],
    )
    .await;
    assert_eq!(suppressed.status(), 303);
    let listed: Value = app
        .client
        .get(app.url("/v1/suppressions?email=erase.me@example.com"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["reason"], "manual", "{listed}");
    // Erasing needs the box ticked; without it nothing is erased.
    let unconfirmed = post_form(&app, &writer.cookie, &erase, &[("csrf", &writer.csrf)]).await;
    assert_eq!(unconfirmed.status(), 422);
    assert_eq!(app.read(&format!("/v1/contacts/{id}")).await.status(), 200);
    let erased = post_form(
        &app,
        &writer.cookie,
        &erase,
        &[("csrf", &writer.csrf), ("confirm", "erase")],
    )
    .await;
    assert_eq!(erased.status(), 303);
    assert_eq!(
        erased.headers()["location"],
        "/console/contacts?done=erased"
    );
    assert_eq!(app.read(&format!("/v1/contacts/{id}")).await.status(), 410);
}

#[tokio::test]
async fn the_operations_page_lists_subscriptions_with_their_breakers() {
    let app = crate::helpers::spawn_app_configured(crate::subscriptions::fast).await;
    let created = app
        .client
        .post(app.url("/v1/subscriptions"))
        .bearer_auth(&app.admin_key)
        .json(&json!({"url": "http://127.0.0.1:9/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let (_, s) = sign_in(&app, &app.read_key, &[]).await;
    let page = get(&app, &s.unwrap(), "/console/operations")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("http://127.0.0.1:9/hook") && page.contains("data-subscription="),
        "the subscription is listed"
    );
    assert!(
        page.contains("closed") || page.contains("open"),
        "its breaker is shown"
    );
}
