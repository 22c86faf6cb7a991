//! Outgoing mail: over SMTP (lettre) when the conf turns it on, otherwise written to the outbox
//! folder as `.eml` files (the embedded default), with the path logged so an operator running
//! the quick start can open the verification link.

use crate::conf::{MailConf, SmtpTls};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::path::PathBuf;

enum Transport {
    Outbox(PathBuf),
    Smtp(Box<AsyncSmtpTransport<Tokio1Executor>>),
}

pub struct Mailer {
    from: Mailbox,
    transport: Transport,
}

/// Where a mail went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Outbox(PathBuf),
    Smtp,
}

impl Mailer {
    pub fn new(conf: &MailConf) -> Result<Mailer, String> {
        let from: Mailbox = conf
            .from
            .parse()
            .map_err(|e| format!("smtp.from: {:?} is not a mailbox ({e})", conf.from))?;
        let transport = match &conf.smtp {
            None => Transport::Outbox(conf.outbox_dir.clone()),
            Some(s) => {
                let tls = || {
                    TlsParameters::new(s.host.clone())
                        .map_err(|e| format!("smtp: TLS for {}: {e}", s.host))
                };
                let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
                    .port(s.port)
                    .tls(match s.tls {
                        SmtpTls::StartTls => Tls::Required(tls()?),
                        SmtpTls::Tls => Tls::Wrapper(tls()?),
                        SmtpTls::None => Tls::None,
                    })
                    .timeout(Some(std::time::Duration::from_secs(20)));
                if let (Some(u), Some(p)) = (&s.username, &s.password) {
                    b = b.credentials(Credentials::new(u.expose().clone(), p.expose().clone()));
                }
                Transport::Smtp(Box::new(b.build()))
            }
        };
        Ok(Mailer { from, transport })
    }

    /// Sends a mail with a plain-text part and its HTML alternative. `purpose` names the outbox
    /// file (`verify`, `reset`, `receipt`, …).
    pub async fn send(
        &self,
        to: &str,
        subject: &str,
        text: String,
        html: String,
        purpose: &str,
    ) -> Result<Sent, String> {
        let to_box: Mailbox = to
            .parse()
            .map_err(|e| format!("{to:?} is not a mailbox ({e})"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to_box)
            .subject(subject);
        let message = message
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|e| format!("cannot build the mail: {e}"))?;
        match &self.transport {
            Transport::Smtp(t) => {
                t.send(message).await.map_err(|e| format!("SMTP: {e}"))?;
                Ok(Sent::Smtp)
            }
            Transport::Outbox(dir) => {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let safe_to: String = to
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '.' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let path = dir.join(format!(
                    "{}-{purpose}-{safe_to}-{:08x}.eml",
                    crate::time::now_ms(),
                    rand::random::<u32>()
                ));
                tokio::fs::write(&path, message.formatted())
                    .await
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), to, subject, "mail written to the outbox (SMTP is off)");
                Ok(Sent::Outbox(path))
            }
        }
    }
}
