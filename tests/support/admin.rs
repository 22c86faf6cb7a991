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
use std::path::PathBuf;
use std::sync::Arc;
use tower::ServiceExt;

pub struct Admin {
    pub t: TestStore,
    pub state: AppState,
    pub outbox: PathBuf,
    _dir: tempfile::TempDir,
}

impl Admin {
    /// The shipped conf over a throwaway store, mails to a temp outbox.
    pub async fn new(backend: Backend) -> Admin {
        Admin::with_conf(backend, |text| text).await
    }

    pub async fn with_conf(backend: Backend, edit: impl FnOnce(String) -> String) -> Admin {
        let t = TestStore::new(backend).await;
        let dir = tempfile::tempdir().expect("dir");
        let outbox = dir.path().join("outbox");
        let text = shipped_conf_text()
            .replace("sqlite://data/duang.db", &t.url)
            .replace(
                "\"data/outbox\"",
                &format!("{:?}", outbox.display().to_string()),
            );
        let conf = parse_conf(&edit(text), &[]).expect("test conf parses");
        let state = AppState::new(Arc::new(conf), t.store.clone())
            .await
            .expect("admin state");
        Admin {
            t,
            state,
            outbox,
            _dir: dir,
        }
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
        let mut files: Vec<_> = std::fs::read_dir(&self.outbox)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("mail"))
            .filter(|m| m.lines().any(|l| l.starts_with("To: ") && l.contains(to)))
            .collect()
    }

    /// The link (`path?token=...`) in the newest mail to `to` for `path`.
    pub fn link_in_mail(&self, to: &str, path: &str) -> String {
        let mails = self.mails_to(to);
        let mail = mails.last().unwrap_or_else(|| panic!("no mail to {to}"));
        // Quoted-printable may wrap long lines with a trailing `=`.
        let text = mail
            .replace("=\r\n", "")
            .replace("=\n", "")
            .replace("=3D", "=");
        let at = text
            .find(&format!("{path}?token="))
            .unwrap_or_else(|| panic!("no {path} link in {text}"));
        text[at..]
            .split_whitespace()
            .next()
            .expect("link")
            .to_owned()
    }
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

impl Browser<'_> {
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
