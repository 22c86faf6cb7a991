//! A local SMTP server for tests: it speaks the protocol as a relay does (greeting, EHLO with
//! AUTH PLAIN and LOGIN, MAIL, RCPT, DATA with dot-stuffing, RSET, NOOP, QUIT) and keeps what it
//! was given, so the admin's real SMTP client (lettre) cannot tell it from a mail relay.

use base64::Engine;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Default)]
pub struct Received {
    /// `user:password` from AUTH, if the client logged in.
    pub auth: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

pub struct SmtpFake {
    pub port: u16,
    pub mails: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpFake {
    pub async fn start() -> SmtpFake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mails: Arc<Mutex<Vec<Received>>> = Arc::default();
        let kept = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let _ = session(stream, kept).await;
                });
            }
        });
        SmtpFake { port, mails, task }
    }

    pub fn received(&self) -> Vec<Received> {
        self.mails.lock().expect("lock").clone()
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

async fn session(
    stream: tokio::net::TcpStream,
    kept: Arc<Mutex<Vec<Received>>>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    w.write_all(b"220 smtp.test ESMTP ready\r\n").await?;
    let mut mail = Received::default();
    let mut auth = None;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            w.write_all(
                b"250-smtp.test\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            )
            .await?;
        } else if upper.starts_with("AUTH PLAIN") {
            let parts: Vec<String> = b64(&cmd[10..]).split('\0').map(str::to_owned).collect();
            auth = Some(format!(
                "{}:{}",
                parts.get(1).cloned().unwrap_or_default(),
                parts.get(2).cloned().unwrap_or_default()
            ));
            w.write_all(b"235 2.7.0 Authentication successful\r\n")
                .await?;
        } else if upper.starts_with("AUTH LOGIN") {
            w.write_all(b"334 VXNlcm5hbWU6\r\n").await?;
            line.clear();
            lines.read_line(&mut line).await?;
            let user = b64(&line);
            w.write_all(b"334 UGFzc3dvcmQ6\r\n").await?;
            line.clear();
            lines.read_line(&mut line).await?;
            auth = Some(format!("{user}:{}", b64(&line)));
            w.write_all(b"235 2.7.0 Authentication successful\r\n")
                .await?;
        } else if upper.starts_with("MAIL FROM:") {
            mail = Received {
                auth: auth.clone(),
                from: cmd[10..].trim().to_owned(),
                ..Received::default()
            };
            w.write_all(b"250 2.1.0 OK\r\n").await?;
        } else if upper.starts_with("RCPT TO:") {
            mail.to.push(cmd[8..].trim().to_owned());
            w.write_all(b"250 2.1.5 OK\r\n").await?;
        } else if upper == "DATA" {
            w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            let mut data = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                // Undo dot-stuffing.
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            mail.data = data;
            kept.lock().expect("lock").push(std::mem::take(&mut mail));
            w.write_all(b"250 2.0.0 queued\r\n").await?;
        } else if upper == "RSET" || upper == "NOOP" {
            w.write_all(b"250 OK\r\n").await?;
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            w.write_all(b"502 5.5.2 Command not recognized\r\n").await?;
        }
    }
}
