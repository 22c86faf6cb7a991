//! A real browser for end-to-end tests, and the whole product for it to drive.
//!
//! [`Stack`] starts every part as its own process on loopback, sharing one conf file and one
//! SQLite store: `duang-admin serve` (Stripe on, against the fake), `duang-gateway`,
//! `duang-mock-upstream` (behind every tier, in place of the local demo upstream) and
//! `duang-mock-stripe` (Stripe's API and hosted Checkout page, delivering signed webhooks to the
//! admin's real socket).
//!
//! [`Browser`] is Debian's `chromium`, headless, driven through `chromedriver` (WebDriver) with
//! `fantoccini`. Both programs are required: a machine without them fails the test with the
//! package to install (it is never skipped).

use super::admin::{STRIPE_KEY, STRIPE_WEBHOOK_SECRET, StripeFake};
use super::relay::{Mock, Proc};
use super::{ADMIN_BIN, GATEWAY_BIN, free_port, write_conf};
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long any one wait in these tests may take before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The browser window (and so every screenshot): 1280 by 900.
pub const WINDOW: (u32, u32) = (1280, 900);

/// Polls `check` every 50 ms until it gives a value; panics with `what` after `timeout`.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `url` until it answers 200; fails at once when `proc` exits.
async fn wait_healthy(name: &str, url: &str, proc: &mut Proc, log: &Path) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        if let Some(status) = proc.0.try_wait().expect("try_wait") {
            panic!(
                "{name} exited during start ({status}); its log:\n{}",
                tail(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready at {url} within {WAIT:?}; its log:\n{}",
            tail(log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last few KiB of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut start = text.len().saturating_sub(6000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// The whole relay as processes on loopback.
pub struct Stack {
    /// The dashboard, e.g. `http://127.0.0.1:PORT` (also `admin.public_url`).
    pub admin_url: String,
    /// The API, e.g. `http://127.0.0.1:PORT` (append `/v1/...`).
    pub gateway_url: String,
    /// Where the admin writes its mails (SMTP is off).
    pub outbox: PathBuf,
    pub stripe: StripeFake,
    pub mock: Mock,
    /// The conf both processes run with (for CLI calls against the same store).
    pub conf_path: PathBuf,
    logs: Vec<(&'static str, PathBuf)>,
    _admin: Proc,
    _gateway: Proc,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// The shipped conf with its own ports, a SQLite store and an outbox in a temp dir, Stripe on
    /// against the fake, and the demo provider (which serves every tier while no provider key is
    /// set) pointed at the mock upstream.
    pub async fn start() -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let store_url = format!("sqlite://{}", dir.path().join("data/duang.db").display());
        let conf = write_conf(dir.path(), &store_url);
        let admin_url = format!("http://127.0.0.1:{}", conf.admin_port);
        let gateway_url = format!("http://127.0.0.1:{}", conf.gateway_port);
        let mock = Mock::start(&["--chunks", "4"]);
        let stripe = StripeFake::start(&format!("{admin_url}/stripe/webhook"));
        let shipped = std::fs::read_to_string(&conf.path).expect("conf");
        // `write_conf` moved every 127.0.0.1:8081 (listen, public_url, the demo upstream) to the
        // admin's port; the demo upstream goes to the mock instead.
        let demo = format!("\"{admin_url}/demo/v1\"");
        let stripe_off = "[stripe]\nenabled = false";
        for needle in [demo.as_str(), stripe_off, "https://api.stripe.com"] {
            assert!(shipped.contains(needle), "the shipped conf has {needle}");
        }
        let text = shipped
            .replace(&demo, &format!("\"http://127.0.0.1:{}/v1\"", mock.port))
            .replace(stripe_off, "[stripe]\nenabled = true")
            .replace("https://api.stripe.com", &stripe.url);
        assert!(text.contains(&format!("public_url = \"{admin_url}\"")));
        std::fs::write(&conf.path, text).expect("write conf");

        let outbox = dir.path().join("outbox");
        let admin_log = dir.path().join("admin.log");
        let gateway_log = dir.path().join("gateway.log");
        let spawn = |bin: &str, args: &[&str], log: &Path| {
            let out = std::fs::File::create(log).expect("log file");
            let mut cmd = Command::new(bin);
            cmd.args(args)
                .arg("--conf")
                .arg(&conf.path)
                .env("RUST_LOG", "info")
                .env("STRIPE_SECRET_KEY", STRIPE_KEY)
                .env("STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log file"))
                .stderr(out);
            // A provider key in the environment would take the tiers away from the mock.
            for var in [
                "OPENAI_API_KEY",
                "GEMINI_API_KEY",
                "ANTHROPIC_API_KEY",
                "DUANG_CONF",
            ] {
                cmd.env_remove(var);
            }
            Proc(cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}")))
        };
        // One at a time: each migrates the store at start.
        let mut admin = spawn(ADMIN_BIN, &["serve"], &admin_log);
        wait_healthy(
            "duang-admin serve",
            &format!("{admin_url}/healthz"),
            &mut admin,
            &admin_log,
        )
        .await;
        let mut gateway = spawn(GATEWAY_BIN, &[], &gateway_log);
        wait_healthy(
            "duang-gateway",
            &format!("{gateway_url}/healthz"),
            &mut gateway,
            &gateway_log,
        )
        .await;
        Stack {
            admin_url,
            gateway_url,
            outbox,
            stripe,
            mock,
            conf_path: conf.path.clone(),
            logs: vec![("duang-admin", admin_log), ("duang-gateway", gateway_log)],
            _admin: admin,
            _gateway: gateway,
            _dir: dir,
        }
    }
}

impl Drop for Stack {
    /// A failed test shows what the processes logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, path) in &self.logs {
                eprintln!("---- {name} log (tail) ----\n{}", tail(path));
            }
        }
    }
}

/// Where `name` is on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn required(program: &str, package: &str) -> PathBuf {
    on_path(program).unwrap_or_else(|| {
        panic!(
            "the browser test needs `{program}`, which is not on PATH: install Debian's \
             `{package}` package (`apt-get install -y chromium chromium-driver`)"
        )
    })
}

/// `chromedriver` on a free port, in its own process group so that the browsers it starts die
/// with it.
pub struct Chromedriver {
    pub url: String,
    chromium: PathBuf,
    proc: Proc,
}

impl Chromedriver {
    pub async fn start() -> Chromedriver {
        let chromium = required("chromium", "chromium");
        let driver = required("chromedriver", "chromium-driver");
        let port = free_port();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&driver)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", driver.display()))
        };
        let mut proc = Proc(child);
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = match client.get(format!("{url}/status")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                break;
            }
            if let Some(status) = proc.0.try_wait().expect("try_wait") {
                panic!("chromedriver exited during start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Chromedriver {
            url,
            chromium,
            proc,
        }
    }

    /// A new headless Chromium session, the window 1280x900, pages resolved against `base`.
    pub async fn browser(self, base: &str) -> Browser {
        let chromium = self.chromium.clone();
        let caps: Capabilities = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                ],
            },
            // The console (CSP violations, script errors) for `Browser::console_errors`.
            "goog:loggingPrefs": {"browser": "ALL"},
            "timeouts": {"pageLoad": 30_000, "script": 10_000, "implicit": 0},
        }))
        .expect("capabilities");
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver could not start {}: {e}", chromium.display()));
        Browser {
            client,
            base: base.trim_end_matches('/').to_owned(),
            _driver: self,
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and any browser a failed test left open.
        if let Ok(pid) = i32::try_from(self.proc.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A chromedriver extension command: a POST to `session/{id}/{path}` with a JSON body. Used for
/// Selenium's log call (`se/log`, the browser console's entries since the last call) and for
/// Chrome DevTools Protocol commands (`goog/cdp/execute`: device metrics for the phone width,
/// emulated media for dark mode).
#[derive(Debug)]
struct SessionPost {
    path: &'static str,
    body: Value,
}

impl WebDriverCompatibleCommand for SessionPost {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/{}",
            session_id.unwrap_or_default(),
            self.path
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(self.body.to_string()))
    }
}

/// A phone's viewport: 390 CSS pixels wide (an iPhone 12 to 15).
pub const PHONE: (u32, u32) = (390, 844);

/// axe-core's script, installed once from the npm registry into `target/axe` (a missing `npm`
/// fails the test, naming it).
pub fn axe_source() -> String {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/axe");
    let script = dir.join("node_modules/axe-core/axe.min.js");
    if !script.is_file() {
        let npm = required("npm", "npm");
        std::fs::create_dir_all(&dir).expect("target/axe");
        let out = Command::new(npm)
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg("axe-core@4.14.1")
            .output()
            .expect("run npm");
        assert!(
            out.status.success() && script.is_file(),
            "npm install axe-core failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read_to_string(&script).expect("axe.min.js")
}

/// What [`Browser::overflowing`] runs: elements wider than the viewport, outside any element
/// that scrolls sideways itself (a table that scrolls inside its card is fine).
const OVERFLOW_JS: &str = r#"
const vw = document.documentElement.clientWidth;
const bad = [];
if (document.documentElement.scrollWidth > vw) bad.push('the page scrolls sideways: ' + document.documentElement.scrollWidth + ' > ' + vw);
for (const e of document.body.querySelectorAll('*')) {
  let p = e.parentElement, inside = false;
  while (p && p !== document.body) {
    const ox = getComputedStyle(p).overflowX;
    if (ox === 'auto' || ox === 'scroll' || ox === 'hidden') { inside = true; break; }
    p = p.parentElement;
  }
  if (inside) continue;
  const r = e.getBoundingClientRect();
  if (r.width > 0 && r.height > 0 && (r.right > vw + 1 || r.left < -1)) {
    bad.push(e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className && typeof e.className === 'string' ? '.' + e.className.split(' ').join('.') : '') + ' spans ' + Math.round(r.left) + '..' + Math.round(r.right));
  }
}
if (document.documentElement.scrollWidth > vw && bad.length === 1) {
  // Something inside a scroller escapes it (an absolutely positioned child): name the widest.
  const wide = [...document.body.querySelectorAll('*')]
    .map(e => [e, e.getBoundingClientRect().right])
    .filter(([e, right]) => right > vw + 1 && right <= document.documentElement.scrollWidth + 1)
    .sort((a, b) => b[1] - a[1]).slice(0, 3)
    .map(([e, right]) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + '.' + (typeof e.className === 'string' ? e.className : '') + ' in ' + (e.parentElement ? e.parentElement.tagName.toLowerCase() + '.' + e.parentElement.className : '') + ' ends at ' + Math.round(right));
  bad.push('widest: ' + wide.join(', '));
}
return bad.slice(0, 12);
"#;

/// One headless Chromium session.
pub struct Browser {
    pub client: Client,
    base: String,
    _driver: Chromedriver,
}

fn css(selector: &str) -> Locator<'_> {
    Locator::Css(selector)
}

impl Browser {
    /// `path` on the base URL, or a whole URL.
    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub async fn open(&self, path: &str) {
        let url = self.url(path);
        self.client
            .goto(&url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    pub async fn current_url(&self) -> url::Url {
        self.client.current_url().await.expect("current url")
    }

    /// The path and query of the page shown.
    pub async fn path(&self) -> String {
        let u = self.current_url().await;
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        }
    }

    /// What the browser shows, for a failure message: its URL, the page's text, and the console.
    pub async fn describe(&self) -> String {
        let url = self.client.current_url().await.map(|u| u.to_string());
        let text = match self.client.find(css("body")).await {
            Ok(b) => b.text().await.unwrap_or_default(),
            Err(e) => format!("(no body: {e})"),
        };
        format!(
            "the browser is at {url:?}; the page says:\n{text}\nconsole: {:?}",
            self.console().await
        )
    }

    /// Fails the test with `what` and what the browser shows.
    pub async fn fail(&self, what: &str) {
        panic!("{what}; {}", self.describe().await)
    }

    /// Waits until the page shown is `prefix` (a path, or a whole URL), followed by anything.
    pub async fn wait_for_url(&self, prefix: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let u = self.current_url().await;
            let shown = if prefix.starts_with("http") {
                u.to_string()
            } else {
                self.path().await
            };
            if shown.starts_with(prefix) {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("never reached {prefix}")).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The element, waiting for it to appear.
    pub async fn find(&self, selector: &str) -> fantoccini::elements::Element {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(e) = self.client.find(css(selector)).await {
                return e;
            }
            if Instant::now() > deadline {
                self.fail(&format!("no {selector} on the page")).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many elements match, now.
    pub async fn count(&self, selector: &str) -> usize {
        self.client
            .find_all(css(selector))
            .await
            .map_or(0, |v| v.len())
    }

    /// The element's visible text.
    async fn cdp(&self, cmd: &str, params: Value) {
        self.client
            .issue_cmd(SessionPost {
                path: "goog/cdp/execute",
                body: json!({"cmd": cmd, "params": params}),
            })
            .await
            .unwrap_or_else(|e| panic!("CDP {cmd}: {e}"));
    }

    /// Emulates a phone (390 px wide, touch), or back to the window.
    pub async fn phone(&self, on: bool) {
        if on {
            self.cdp(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": PHONE.0, "height": PHONE.1, "deviceScaleFactor": 1, "mobile": true}),
            )
            .await;
        } else {
            self.cdp("Emulation.clearDeviceMetricsOverride", json!({}))
                .await;
        }
    }

    /// Emulates `prefers-color-scheme: dark` (or the default).
    pub async fn dark(&self, on: bool) {
        let value = if on { "dark" } else { "" };
        self.cdp(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": value}]}),
        )
        .await;
    }

    /// Runs a script in the page and returns its value.
    pub async fn run_js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// The page's elements wider than the viewport (see [`OVERFLOW_JS`]).
    pub async fn overflowing(&self) -> Vec<String> {
        match self.run_js(OVERFLOW_JS).await {
            Value::Array(v) => v
                .into_iter()
                .map(|x| x.as_str().unwrap_or_default().to_owned())
                .collect(),
            other => vec![format!("(unexpected answer {other})")],
        }
    }

    /// axe-core's critical and serious violations on the page (WCAG 2.1 A and AA rules), one
    /// line each with the rule, its impact and the first elements it names.
    pub async fn axe_violations(&self, axe: &str) -> Vec<String> {
        self.run_js(&format!("{axe}\n;return true;")).await;
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})
                   .then(r => done(r.violations.filter(v => v.impact === 'critical' || v.impact === 'serious')
                     .map(v => v.id + ' (' + v.impact + '): ' + v.help + ' — ' + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '))))
                   .catch(e => done(['axe failed: ' + e]));",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("axe: {e}"));
        match result {
            Value::Array(v) => v
                .into_iter()
                .map(|x| x.as_str().unwrap_or_default().to_owned())
                .collect(),
            other => vec![format!("(unexpected axe answer {other})")],
        }
    }

    /// An attribute of the element (empty when it has none).
    pub async fn attr(&self, selector: &str, name: &str) -> String {
        self.find(selector)
            .await
            .attr(name)
            .await
            .unwrap_or_else(|e| panic!("{selector}[{name}]: {e}"))
            .unwrap_or_default()
    }

    pub async fn text(&self, selector: &str) -> String {
        self.find(selector).await.text().await.expect("text")
    }

    /// Waits until `selector`'s text contains `needle`; returns the text.
    pub async fn wait_for_text(&self, selector: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(e) = self.client.find(css(selector)).await
                && let Ok(t) = e.text().await
                && t.contains(needle)
            {
                return t;
            }
            if Instant::now() > deadline {
                self.fail(&format!("{selector} never showed {needle:?}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types into an input, as a user does.
    pub async fn type_into(&self, selector: &str, text: &str) {
        let e = self.find(selector).await;
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    /// Clicks the element.
    pub async fn click(&self, selector: &str) {
        self.find(selector)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {selector}: {e}"));
    }

    /// Clicks the `tag` (`button`, `a`) whose text is exactly `label`.
    pub async fn click_on(&self, tag: &str, label: &str) {
        let xpath = format!("//{tag}[normalize-space()='{label}']");
        let deadline = Instant::now() + WAIT;
        let e = loop {
            if let Ok(e) = self.client.find(Locator::XPath(&xpath)).await {
                break e;
            }
            if Instant::now() > deadline {
                self.fail(&format!("no {tag} {label:?} on the page")).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        e.click()
            .await
            .unwrap_or_else(|err| panic!("click {tag} {label:?}: {err}"));
    }

    /// The console's entries since the last call (`level: message`).
    pub async fn console(&self) -> Vec<String> {
        match self
            .client
            .issue_cmd(SessionPost {
                path: "se/log",
                body: json!({"type": "browser"}),
            })
            .await
        {
            Ok(Value::Array(entries)) => entries
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e["level"].as_str().unwrap_or("?"),
                        e["message"].as_str().unwrap_or_default()
                    )
                })
                .collect(),
            Ok(other) => vec![format!("(unexpected log answer {other})")],
            Err(e) => vec![format!("(no console log: {e})")],
        }
    }

    /// Fails when the console has errors (a CSP violation, a script error, a failed load) since
    /// the last look.
    pub async fn assert_clean_console(&self, page: &str) {
        let errors: Vec<String> = self
            .console()
            .await
            .into_iter()
            .filter(|e| e.starts_with("SEVERE"))
            .collect();
        assert!(
            errors.is_empty(),
            "{page}: the browser console has errors: {errors:#?}"
        );
    }

    /// A PNG of the window, as `target/screenshots/NAME.png`, and as `docs/screenshots/NAME.png`
    /// when `DUANG_UPDATE_SCREENSHOTS=1`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut dirs = vec![root.join("target/screenshots")];
        if std::env::var("DUANG_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
            dirs.push(root.join("docs/screenshots"));
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir).expect("screenshot dir");
            std::fs::write(dir.join(format!("{name}.png")), &png).expect("write screenshot");
        }
    }

    /// Ends the session (the browser quits; chromedriver stops when this is dropped).
    pub async fn close(self) {
        let Browser { client, .. } = self;
        client.close().await.expect("close the browser");
    }
}
