//! The admin's router in-process (`app(state)`, no socket) over a real store, with a "browser"
//! that keeps its session cookie and reads CSRF tokens out of the pages it gets, and the outbox
//! where the admin writes its mails.

use super::{TestStore, parse_conf, shipped_conf_text};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use duang::admin::server::{AppState, app};
use duang::conf::Backend;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tower::ServiceExt;

pub struct Admin {
    pub t: TestStore,
    pub state: AppState,
    pub outbox: PathBuf,
    /// The Stripe fake, when the admin was started with Stripe on.
    pub stripe: Option<StripeFake>,
    /// The admin's real listener (for the fake's webhook deliveries), when Stripe is on.
    pub admin_url: Option<String>,
    _dir: tempfile::TempDir,
}

pub const STRIPE_KEY: &str = "sk_test_duang_fake";
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_duang_fake";
pub const SMTP_USERNAME: &str = "relay-mailer";
pub const SMTP_PASSWORD: &str = "smtp-secret";
pub const STRIPE_FAKE_BIN: &str = env!("CARGO_BIN_EXE_duang-mock-stripe");

/// `duang-mock-stripe` as a process: Stripe's API and hosted Checkout page on loopback.
pub struct StripeFake {
    pub url: String,
    pub http: reqwest::Client,
    proc: super::relay::Proc,
}

impl StripeFake {
    pub fn start(webhook_url: &str) -> StripeFake {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(STRIPE_FAKE_BIN)
            .args([
                "--api-key",
                STRIPE_KEY,
                "--webhook-secret",
                STRIPE_WEBHOOK_SECRET,
            ])
            .args(["--webhook-url", webhook_url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn duang-mock-stripe");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the fake prints its address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
            .to_owned();
        StripeFake {
            url,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            proc: super::relay::Proc(child),
        }
    }

    /// Stops the fake (Stripe is down from now on).
    pub fn stop(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("fake answers");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.expect("json")
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("fake answers")
            .json()
            .await
            .expect("json")
    }
}

impl Admin {
    /// The shipped conf over a throwaway store, mails to a temp outbox.
    pub async fn new(backend: Backend) -> Admin {
        Admin::with_conf(backend, |text| text).await
    }

    pub async fn with_conf(backend: Backend, edit: impl FnOnce(String) -> String) -> Admin {
        Admin::build(backend, false, edit).await
    }

    /// The admin with Stripe on, against the Stripe fake, serving webhooks on a real socket.
    pub async fn with_stripe(backend: Backend) -> Admin {
        Admin::build(backend, true, |t| t).await
    }

    async fn build(backend: Backend, stripe: bool, edit: impl FnOnce(String) -> String) -> Admin {
        let t = TestStore::new(backend).await;
        let dir = tempfile::tempdir().expect("dir");
        let outbox = dir.path().join("outbox");
        let mut text = shipped_conf_text()
            .replace("sqlite://data/duang.db", &t.url)
            .replace(
                "\"data/outbox\"",
                &format!("{:?}", outbox.display().to_string()),
            );
        let mut fake = None;
        let mut listener = None;
        if stripe {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let admin_url = format!("http://{}", l.local_addr().expect("addr"));
            let f = StripeFake::start(&format!("{admin_url}/stripe/webhook"));
            text = text
                .replace("[stripe]\nenabled = false", "[stripe]\nenabled = true")
                .replace("https://api.stripe.com", &f.url)
                .replace(
                    "public_url = \"http://127.0.0.1:8081\"",
                    &format!("public_url = {admin_url:?}"),
                );
            fake = Some(f);
            listener = Some((l, admin_url));
        }
        let env = [
            ("STRIPE_SECRET_KEY", STRIPE_KEY),
            ("STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET),
            ("SMTP_USERNAME", SMTP_USERNAME),
            ("SMTP_PASSWORD", SMTP_PASSWORD),
        ];
        let conf = parse_conf(&edit(text), &env).expect("test conf parses");
        let state = AppState::new(Arc::new(conf), t.store.clone())
            .await
            .expect("admin state");
        let admin_url = listener.map(|(l, url)| {
            let s = state.clone();
            tokio::spawn(async move {
                let live = duang::admin::server::Live::new(s);
                let _ = duang::admin::server::serve(live, l, std::future::pending()).await;
            });
            url
        });
        Admin {
            t,
            state,
            outbox,
            stripe: fake,
            admin_url,
            _dir: dir,
        }
    }

    /// An operator account (`op@example.com`) with two-factor authentication on (its secret is
    /// [`OPERATOR_TOTP`]), signed in with password and code from its own address.
    pub async fn operator(&self) -> Browser<'_> {
        let op = self
            .t
            .store
            .create_account(&duang::store::NewAccount {
                email: "op@example.com".into(),
                password_hash: Some(duang::password::hash(PASSWORD)),
                role: duang::store::Role::Operator,
                verified: true,
            })
            .await
            .expect("operator");
        self.enrol(op.id, OPERATOR_TOTP).await;
        let mut b = self.browser([10, 9, 9, 9]);
        let r = b
            .submit(
                "/login",
                "/login",
                &[("email", "op@example.com"), ("password", PASSWORD)],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "the code form: {}", r.body);
        let r = b.enter_code(&r, &totp_now(OPERATOR_TOTP)).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        b
    }

    /// Turns 2FA on for an account straight in the store, with `secret` (base32) and no
    /// recovery codes (tests of the enrolment itself go through the pages).
    pub async fn enrol(&self, account_id: i64, secret: &str) {
        self.t
            .store
            .begin_two_factor(account_id, secret)
            .await
            .expect("begin 2FA");
        assert!(
            self.t
                .store
                .enable_two_factor(account_id, 1, &[], "test")
                .await
                .expect("enable 2FA")
        );
    }

    pub fn fake(&self) -> &StripeFake {
        self.stripe.as_ref().expect("started with_stripe")
    }

    pub async fn account(&self, email: &str) -> duang::store::Account {
        self.t
            .store
            .account(&duang::store::AccountRef::Email(email.into()))
            .await
            .expect("account")
    }

    /// A browser on its own address (login limits count per address).
    pub fn browser(&self, ip: [u8; 4]) -> Browser<'_> {
        Browser {
            admin: self,
            cookie: None,
            addr: SocketAddr::from((ip, 40_000)),
        }
    }

    /// The mails written for `to`, oldest first, as text.
    pub fn mails_to(&self, to: &str) -> Vec<String> {
        mails_to(&self.outbox, to)
    }

    /// The link (`path?token=...`) in the newest mail to `to` for `path`.
    pub fn link_in_mail(&self, to: &str, path: &str) -> String {
        link_in_mail(&self.outbox, to, path)
    }
}

/// The mails in `outbox` (the admin writes them there while SMTP is off) for `to`, oldest first,
/// as text.
pub fn mails_to(outbox: &Path, to: &str) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(outbox)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("mail"))
        .filter(|m| m.lines().any(|l| l.starts_with("To: ") && l.contains(to)))
        .collect()
}

/// The link (`path?token=...`) in the newest mail to `to` for `path`, without its origin.
pub fn link_in_mail(outbox: &Path, to: &str, path: &str) -> String {
    let url = url_in_mail(outbox, to, path);
    let at = url.find(&format!("{path}?token=")).expect("the path");
    url[at..].to_owned()
}

/// The whole link, as the customer clicks it (`https://host/path?token=...`), in the newest mail
/// to `to` for `path`.
pub fn url_in_mail(outbox: &Path, to: &str, path: &str) -> String {
    let mails = mails_to(outbox, to);
    let mail = mails.last().unwrap_or_else(|| panic!("no mail to {to}"));
    // Quoted-printable may wrap long lines with a trailing `=`.
    let text = mail
        .replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=");
    let at = text
        .find(&format!("{path}?token="))
        .unwrap_or_else(|| panic!("no {path} link in {text}"));
    let start = text[..at].rfind(char::is_whitespace).map_or(0, |i| i + 1);
    text[start..]
        .split_whitespace()
        .next()
        .expect("link")
        .to_owned()
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The CSRF token of the first form on the page.
    pub fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field in {}", self.body));
        let rest = &self.body[at + 19..];
        rest[..rest.find('"').expect("end")].to_owned()
    }
}

pub struct Browser<'a> {
    admin: &'a Admin,
    pub cookie: Option<String>,
    addr: SocketAddr,
}

/// The password test accounts sign up with.
pub const PASSWORD: &str = "correct horse 42";
/// The TOTP secret of [`Admin::operator`]'s account (base32, 160 bits).
pub const OPERATOR_TOTP: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

/// The TOTP code of `secret` (base32) at `unix_s`, computed by the `totp-rs` crate (not the
/// admin's own code).
pub fn totp_at(secret: &str, unix_s: u64) -> String {
    let bytes = totp_rs::Secret::Encoded(secret.to_owned())
        .to_bytes()
        .expect("base32 secret");
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, bytes)
        .expect("TOTP parameters")
        .generate(unix_s)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The code for the current step.
pub fn totp_now(secret: &str) -> String {
    totp_at(secret, unix_now())
}

/// The value of hidden field `name` on a page.
pub fn hidden(body: &str, name: &str) -> String {
    let needle = format!("name=\"{name}\" value=\"");
    let at = body
        .find(&needle)
        .unwrap_or_else(|| panic!("no field {name} in {body}"));
    let rest = &body[at + needle.len()..];
    rest[..rest.find('"').expect("end")].to_owned()
}

impl Browser<'_> {
    /// Posts the sign-up form; returns the answer (200 "Check your mailbox" when the input is
    /// good, whether or not the address had an account).
    pub async fn try_sign_up(&mut self, email: &str) -> Resp {
        self.submit(
            "/signup",
            "/signup",
            &[("email", email), ("password", PASSWORD)],
        )
        .await
    }

    /// Signs up through the form, then logs in with the same password (sign-up itself signs
    /// nobody in); the browser is then logged in.
    pub async fn sign_up(&mut self, email: &str) {
        let r = self.try_sign_up(email).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(r.body.contains("Check your mailbox"), "{}", r.body);
        self.log_in(email).await;
    }

    /// Logs in through the form with [`PASSWORD`] (an account without 2FA).
    pub async fn log_in(&mut self, email: &str) {
        let r = self
            .submit(
                "/login",
                "/login",
                &[("email", email), ("password", PASSWORD)],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    }

    /// Posts the log-in's second step: `code_page` is the code form the password step answered.
    pub async fn enter_code(&mut self, code_page: &Resp, code: &str) -> Resp {
        let ticket = hidden(&code_page.body, "ticket");
        let next = hidden(&code_page.body, "next");
        let csrf = code_page.csrf();
        self.post_form(
            "/login/code",
            &[
                ("csrf", csrf.as_str()),
                ("ticket", ticket.as_str()),
                ("next", next.as_str()),
                ("totp_code", code),
            ],
        )
        .await
    }

    /// A GET whose body is kept as the frames it arrived in (a streamed answer has many).
    pub async fn get_frames(
        &mut self,
        path: &str,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<bytes::Bytes>) {
        let mut req = Request::get(path).body(Body::empty()).expect("request");
        req.extensions_mut().insert(ConnectInfo(self.addr));
        if let Some(c) = &self.cookie {
            req.headers_mut().insert(
                header::COOKIE,
                format!("duang_sid={c}").parse().expect("cookie"),
            );
        }
        let r = app(self.admin.state.clone())
            .oneshot(req)
            .await
            .expect("infallible");
        let (status, headers) = (r.status(), r.headers().clone());
        let mut body = r.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                frames.push(data);
            }
        }
        (status, headers, frames)
    }

    pub async fn send(&mut self, req: Request<Body>) -> Resp {
        let mut req = req;
        req.extensions_mut().insert(ConnectInfo(self.addr));
        if let Some(c) = &self.cookie {
            req.headers_mut().insert(
                header::COOKIE,
                format!("duang_sid={c}").parse().expect("cookie"),
            );
        }
        let r = app(self.admin.state.clone())
            .oneshot(req)
            .await
            .expect("infallible");
        for v in r.headers().get_all(header::SET_COOKIE) {
            let v = v.to_str().expect("ascii");
            if let Some(rest) = v.strip_prefix("duang_sid=") {
                let value = rest.split(';').next().unwrap_or_default();
                self.cookie =
                    (!value.is_empty() && !v.contains("Max-Age=0")).then(|| value.to_owned());
            }
        }
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.into_body().collect().await.expect("body").to_bytes();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        self.send(Request::get(path).body(Body::empty()).expect("req"))
            .await
    }

    /// Posts a form as a browser would (the caller includes `csrf` when the form has it).
    pub async fn post_form(&mut self, path: &str, fields: &[(&str, &str)]) -> Resp {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send(
            Request::post(path)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .expect("req"),
        )
        .await
    }

    /// Loads `page`, then posts its form to `action` with the page's CSRF token.
    pub async fn submit(&mut self, page: &str, action: &str, fields: &[(&str, &str)]) -> Resp {
        let csrf = self.get(page).await.csrf();
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.post_form(action, &all).await
    }

    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        csrf: Option<&str>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = csrf {
            b = b.header("x-csrf-token", t);
        }
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        };
        self.send(req.expect("req")).await
    }
}
