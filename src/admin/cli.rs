//! The operator CLI: subcommands of `duang-admin`. Each command validates everything it was
//! given before it writes anything, and says what it did in one or two plain lines.

use crate::conf::{Conf, DEFAULT_CONF_PATH};
use crate::money::NanoUsd;
use crate::store::{
    AccountRef, AccountStatus, LedgerKind, LimitOverrides, NewAccount, NewKey, NewLedgerEntry,
    Role, Store,
};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "duang-admin",
    version,
    about = "Duang Duang relay: the admin server and the operator CLI"
)]
pub struct Cli {
    /// The conf file.
    #[arg(long, global = true, env = "DUANG_CONF", default_value = DEFAULT_CONF_PATH)]
    pub conf: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the whole relay: migrate the store, run the admin server and the gateway.
    Up,
    /// Run the admin HTTP server only.
    Serve,
    /// Validate the conf file (and its secrets' environment variables) and exit.
    CheckConf,
    /// Apply the store's migrations and exit.
    Migrate,
    /// Create, verify, suspend, reactivate, terminate and show accounts.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Grant or adjust credits (a ledger entry with a reason).
    #[command(subcommand)]
    Credits(CreditsCmd),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Show an account's balance with the proof that it equals the ledger sum.
    Balance { account: String },
    /// Check every account's cached balance against its ledger; non-zero exit on any mismatch.
    Reconcile,
    /// Gateway instances and the credit they hold leased; release a gone instance's leases.
    #[command(subcommand)]
    Leases(LeasesCmd),
    /// Record what you prepaid to an upstream provider, and see what is left of it.
    #[command(subcommand, name = "upstream-credit")]
    UpstreamCredit(UpstreamCreditCmd),
    /// Make the running gateway(s) and admin server reread the conf file (as SIGHUP does): new
    /// requests use it, requests in flight finish under the old one. A conf that does not
    /// validate, or that changes a setting only a restart applies, is refused and the running
    /// conf stays; each process's answer is printed.
    Reload {
        /// A gateway's metrics listener (`gateway.metrics_listen` of its conf), HOST:PORT;
        /// repeat for several nodes. Default: this conf's.
        #[arg(long = "gateway", value_name = "HOST:PORT")]
        gateways: Vec<String>,
        /// The admin server's base URL. Default: http:// and this conf's `admin.listen`.
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// Reload the gateways only.
        #[arg(long)]
        no_admin: bool,
    },
    /// Write the ledger, the usage records or the audit log of a date range as CSV on standard
    /// output, oldest first (the operator's exports for accounting).
    #[command(subcommand)]
    Export(ExportCmd),
}

#[derive(Debug, Subcommand)]
pub enum UpstreamCreditCmd {
    /// Record a prepayment to PROVIDER (a provider of the conf); its provider cost counts
    /// against it from now on. A negative amount corrects a mistake and needs --note.
    Add {
        provider: String,
        /// Amount in USD, e.g. 500 or 125.50.
        #[arg(long, allow_hyphen_values = true)]
        usd: String,
        /// The provider's invoice or payment id: the same reference is never recorded twice.
        #[arg(long = "ref")]
        reference: String,
        #[arg(long)]
        note: Option<String>,
    },
    /// Each provider's prepaid credit: recorded, spent, left, the spend rate over the last 7
    /// days and the days left at it; then every prepayment recorded.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// Ledger entries: top-ups, usage, refunds, adjustments.
    Ledger(ExportRange),
    /// Usage records, with billed amount, provider cost and platform loss.
    Usage(ExportRange),
    /// The audit log.
    Audit {
        #[command(flatten)]
        range: ExportRange,
        /// Only this actor (`cli:NAME`, `operator:EMAIL`, …).
        #[arg(long)]
        actor: Option<String>,
        /// Only actions starting with this (`key.` for every key action).
        #[arg(long)]
        action: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ExportRange {
    /// First day, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub from: String,
    /// Last day, inclusive.
    #[arg(long)]
    pub to: String,
    /// One account (id or e-mail); default: all.
    #[arg(long)]
    pub account: Option<String>,
}

impl ExportRange {
    /// `[from, to)` in ms, checked.
    fn days(&self) -> anyhow::Result<(i64, i64)> {
        let day = |flag: &str, v: &str| {
            crate::time::parse_date(v)
                .with_context(|| format!("{flag} {v:?} is not a date: use YYYY-MM-DD"))
        };
        let (from, to) = (
            day("--from", &self.from)?,
            day("--to", &self.to)? + 86_400_000,
        );
        if from >= to {
            bail!("--from {} is after --to {}", self.from, self.to);
        }
        if let Some(a) = &self.account {
            account_ref(a)?;
        }
        Ok((from, to))
    }
}

#[derive(Debug, Subcommand)]
pub enum LeasesCmd {
    /// List gateway instances with their heartbeat and leases (add --accounts for each lease).
    List {
        #[arg(long)]
        accounts: bool,
    },
    /// Return an instance's leases to the balances now (it must have stopped renewing its
    /// heartbeat; gone instances are also swept by the gateways after gateway.lease_expiry_ms).
    Release {
        /// The instance id, as `leases list` shows it (`node/start`).
        instance: String,
        /// Release even though the instance renewed its heartbeat recently (only if you know
        /// its process is gone: a live one would go on spending credit it no longer holds).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Create an account (zero balance).
    Create {
        #[arg(long)]
        email: String,
        /// Give it the operator role (dashboard operator pages).
        #[arg(long)]
        operator: bool,
        /// Mark the e-mail verified at once.
        #[arg(long)]
        verified: bool,
        /// Read a dashboard password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Mark an account's e-mail verified.
    Verify { account: String },
    /// Suspend an account: its keys stop working; the reason goes to the audit log.
    Suspend {
        account: String,
        #[arg(long)]
        reason: String,
    },
    /// Reactivate a suspended account.
    Reactivate {
        account: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Terminate an account for good.
    Terminate {
        account: String,
        #[arg(long)]
        reason: String,
    },
    /// Turn off an account's two-factor authentication (a lost phone and lost recovery codes,
    /// after checking who asks); the reason goes to the audit log. They can set it up again.
    #[command(name = "reset-2fa")]
    ResetTwoFactor {
        account: String,
        #[arg(long)]
        reason: String,
    },
    /// Show one account.
    Show { account: String },
    /// List accounts, optionally those whose e-mail contains SEARCH.
    List {
        #[arg(long, default_value = "")]
        search: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCmd {
    /// Add (or, with a negative amount and a reason, remove) credits.
    #[command(visible_alias = "adjust")]
    Grant(GrantArgs),
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    pub account: String,
    /// Amount in USD, e.g. 10 or 2.50; negative removes credits and needs --reason.
    #[arg(long, allow_hyphen_values = true)]
    pub usd: String,
    #[arg(long)]
    pub reason: Option<String>,
    /// A unique reference; the same reference is never applied twice (safe to retry).
    #[arg(long = "ref")]
    pub reference: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create a key; the key is printed once on standard output and stored only as a hash.
    Create(KeyCreateArgs),
    /// List an account's keys.
    List { account: String },
    /// Revoke a key by id (it stops working; this cannot be undone).
    Revoke {
        key_id: i64,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct KeyCreateArgs {
    pub account: String,
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Expire the key after this many days.
    #[arg(long)]
    pub expires_in_days: Option<u32>,
    #[arg(long)]
    pub requests_per_minute: Option<i64>,
    #[arg(long)]
    pub tokens_per_minute: Option<i64>,
    #[arg(long)]
    pub in_flight: Option<i64>,
    /// Stop the key once it has spent this much (USD).
    #[arg(long)]
    pub spend_cap_usd: Option<String>,
    /// Comma-separated tiers the key may use (default: all).
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
}

/// Who the CLI acts as, for the ledger and the audit log.
fn actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "operator".into())
    )
}

fn account_ref(s: &str) -> anyhow::Result<AccountRef> {
    s.parse::<AccountRef>().map_err(anyhow::Error::msg)
}

fn time(ms: Option<i64>) -> String {
    ms.map(crate::time::format_utc)
        .unwrap_or_else(|| "-".into())
}

/// Runs a store-backed command (everything but up/serve/check-conf).
pub async fn run_store_command(conf: &Conf, command: Command) -> anyhow::Result<()> {
    // Validate what can be validated before touching the store.
    let command = precheck(conf, command)?;
    let store = Store::open(&conf.store).await?;
    if let Command::Leases(cmd) = command {
        let result = leases(conf, &store, cmd).await;
        store.close().await;
        return result;
    }
    if let Command::Reload {
        gateways,
        admin,
        no_admin,
    } = command
    {
        let key = crate::admin::server::signing_key(conf, &store).await;
        store.close().await;
        let key = key.map_err(|e| anyhow::anyhow!("cannot read the admin's signing key: {e}"))?;
        return reload(conf, &key, gateways, (!no_admin).then_some(admin)).await;
    }
    let result = dispatch(&store, command).await;
    store.close().await;
    result
}

/// Checks arguments that need no store, so a bad call writes nothing and opens nothing.
fn precheck(conf: &Conf, command: Command) -> anyhow::Result<Command> {
    match &command {
        Command::Account(AccountCmd::Create { email, .. }) if !crate::email::is_valid(email) => {
            bail!("{email:?} is not a valid e-mail address")
        }
        Command::UpstreamCredit(UpstreamCreditCmd::Add {
            provider,
            usd,
            note,
            ..
        }) => {
            if !conf.providers.iter().any(|p| &p.name == provider) {
                let known: Vec<&str> = conf.providers.iter().map(|p| p.name.as_str()).collect();
                bail!(
                    "no provider named {provider:?} in {} (known: {})",
                    conf.source,
                    known.join(", ")
                );
            }
            let amount: NanoUsd = usd.parse().with_context(|| format!("--usd {usd}"))?;
            if amount == NanoUsd::ZERO {
                bail!("--usd 0: a prepayment must change the credit");
            }
            if amount.is_negative() && note.as_deref().is_none_or(|r| r.trim().is_empty()) {
                bail!("a negative amount corrects a recorded prepayment: say why with --note");
            }
        }
        Command::Credits(CreditsCmd::Grant(g)) => {
            let amount: NanoUsd = g.usd.parse().with_context(|| format!("--usd {}", g.usd))?;
            if amount == NanoUsd::ZERO {
                bail!("--usd 0: a grant must change the balance");
            }
            if amount.is_negative() && g.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                bail!("a negative grant takes credits away: say why with --reason");
            }
            account_ref(&g.account)?;
        }
        Command::Key(KeyCmd::Create(k)) => {
            account_ref(&k.account)?;
            if let Some(models) = &k.models {
                for m in models {
                    if conf.tier(m).is_none() {
                        let known: Vec<_> = conf.tiers.iter().map(|t| t.name.as_str()).collect();
                        bail!(
                            "--models: no tier named {m:?} (known: {})",
                            known.join(", ")
                        );
                    }
                }
            }
            if let Some(cap) = &k.spend_cap_usd {
                let cap: NanoUsd = cap
                    .parse()
                    .with_context(|| format!("--spend-cap-usd {cap}"))?;
                if !cap.is_positive() {
                    bail!("--spend-cap-usd must be positive");
                }
            }
            for (flag, v) in [
                ("--requests-per-minute", k.requests_per_minute),
                ("--tokens-per-minute", k.tokens_per_minute),
                ("--in-flight", k.in_flight),
            ] {
                if v.is_some_and(|v| v <= 0) {
                    bail!("{flag} must be positive");
                }
            }
            if k.expires_in_days == Some(0) {
                bail!("--expires-in-days must be at least 1");
            }
        }
        Command::Account(
            AccountCmd::Verify { account }
            | AccountCmd::Suspend { account, .. }
            | AccountCmd::Reactivate { account, .. }
            | AccountCmd::Terminate { account, .. }
            | AccountCmd::ResetTwoFactor { account, .. }
            | AccountCmd::Show { account },
        )
        | Command::Key(KeyCmd::List { account })
        | Command::Balance { account } => {
            account_ref(account)?;
        }
        Command::Export(
            ExportCmd::Ledger(range) | ExportCmd::Usage(range) | ExportCmd::Audit { range, .. },
        ) => {
            range.days()?;
        }
        _ => {}
    }
    Ok(command)
}

async fn dispatch(store: &Store, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let applied = store.migrate().await?;
            println!("store is up to date ({applied} migration(s) applied now)");
        }
        Command::Account(cmd) => account(store, cmd).await?,
        Command::Credits(CreditsCmd::Grant(g)) => grant(store, g).await?,
        Command::UpstreamCredit(cmd) => upstream_credit(store, cmd).await?,
        Command::Key(cmd) => key(store, cmd).await?,
        Command::Balance { account } => balance(store, &account).await?,
        Command::Export(cmd) => export(store, cmd).await?,
        Command::Reconcile => {
            let bad = store.reconcile().await?;
            if !bad.is_empty() {
                for p in &bad {
                    eprintln!(
                        "MISMATCH account {}: cached {} but the ledger sums to {} ({} entries)",
                        p.account_id, p.cached, p.ledger_sum, p.entries
                    );
                }
                bail!("{} account(s) do not match their ledger", bad.len());
            }
            println!("ok: every account's balance equals its ledger sum");
        }
        Command::Up
        | Command::Serve
        | Command::CheckConf
        | Command::Leases(_)
        | Command::Reload { .. } => {
            unreachable!("handled before the store command dispatch")
        }
    }
    Ok(())
}

async fn export(store: &Store, cmd: ExportCmd) -> anyhow::Result<()> {
    use super::exports;
    let range = match &cmd {
        ExportCmd::Ledger(r) | ExportCmd::Usage(r) | ExportCmd::Audit { range: r, .. } => r,
    };
    let (from, to) = range.days()?;
    let account = match &range.account {
        Some(a) => Some(store.account(&account_ref(a)?).await?.id),
        None => None,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let rows = match &cmd {
        ExportCmd::Ledger(_) => {
            let rows = store.ledger_export(from, to, account);
            exports::write_csv(rows, exports::LEDGER_HEADER, exports::ledger_line, &mut out).await?
        }
        ExportCmd::Usage(_) => {
            let rows = store.usage_export(from, to, account);
            exports::write_csv(rows, exports::USAGE_HEADER, exports::usage_line, &mut out).await?
        }
        ExportCmd::Audit { actor, action, .. } => {
            let rows = store.audit_export(&crate::store::AuditFilter {
                from_ms: Some(from),
                to_ms: Some(to),
                actor: actor.clone(),
                action: action.clone(),
                account_id: account,
            });
            exports::write_csv(rows, exports::AUDIT_HEADER, exports::audit_line, &mut out).await?
        }
    };
    eprintln!("{rows} row(s)");
    Ok(())
}

async fn account(store: &Store, cmd: AccountCmd) -> anyhow::Result<()> {
    match cmd {
        AccountCmd::Create {
            email,
            operator,
            verified,
            password_stdin,
        } => {
            let password_hash = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("reading the password from standard input")?;
                let pw = line.trim_end_matches(['\r', '\n']);
                crate::password::check_strength(pw)?;
                Some(crate::password::hash(pw))
            } else {
                None
            };
            let a = store
                .create_account(&NewAccount {
                    email,
                    password_hash,
                    role: if operator {
                        Role::Operator
                    } else {
                        Role::Customer
                    },
                    verified,
                })
                .await?;
            println!(
                "created account {} {} ({}, {})",
                a.id,
                a.email,
                a.role.as_str(),
                if a.is_verified() {
                    "verified"
                } else {
                    "e-mail not verified"
                }
            );
        }
        AccountCmd::Verify { account } => {
            let a = store.account(&account_ref(&account)?).await?;
            let a = store.mark_verified(a.id).await?;
            println!("account {} {} is verified", a.id, a.email);
        }
        AccountCmd::Suspend { account, reason } => {
            set_status(store, &account, AccountStatus::Suspended, Some(&reason)).await?;
        }
        AccountCmd::Reactivate { account, reason } => {
            set_status(store, &account, AccountStatus::Active, reason.as_deref()).await?;
        }
        AccountCmd::Terminate { account, reason } => {
            set_status(store, &account, AccountStatus::Terminated, Some(&reason)).await?;
        }
        AccountCmd::ResetTwoFactor { account, reason } => {
            if reason.trim().is_empty() {
                bail!("--reason must say why (it goes to the audit log)");
            }
            let a = store.account(&account_ref(&account)?).await?;
            if store
                .disable_two_factor(a.id, "cli", Some(reason.trim()))
                .await?
            {
                println!(
                    "account {} {}: two-factor authentication is off",
                    a.id, a.email
                );
            } else {
                bail!(
                    "account {} {} has no two-factor authentication",
                    a.id,
                    a.email
                );
            }
        }
        AccountCmd::Show { account } => {
            let a = store.account(&account_ref(&account)?).await?;
            println!("account   {}", a.id);
            println!("email     {}", a.email);
            println!("verified  {}", if a.is_verified() { "yes" } else { "no" });
            println!("status    {}", a.status.as_str());
            println!("role      {}", a.role.as_str());
            println!("balance   {}", a.balance);
            println!("created   {}", time(Some(a.created_at)));
        }
        AccountCmd::List { search } => {
            let accounts = store.search_accounts(&search, 1000).await?;
            println!(
                "{:>6}  {:<40} {:<10} {:<9} {:<8} {:>16}",
                "ID", "EMAIL", "STATUS", "ROLE", "VERIFIED", "BALANCE"
            );
            for a in accounts {
                println!(
                    "{:>6}  {:<40} {:<10} {:<9} {:<8} {:>16}",
                    a.id,
                    a.email,
                    a.status.as_str(),
                    a.role.as_str(),
                    if a.is_verified() { "yes" } else { "no" },
                    a.balance.to_string()
                );
            }
        }
    }
    Ok(())
}

async fn set_status(
    store: &Store,
    account: &str,
    status: AccountStatus,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    if reason.is_some_and(|r| r.trim().is_empty()) {
        bail!("--reason must not be empty");
    }
    let a = store.account(&account_ref(account)?).await?;
    let a = store
        .set_account_status(a.id, status, &actor(), reason)
        .await?;
    println!("account {} {} is {}", a.id, a.email, a.status.as_str());
    Ok(())
}

async fn grant(store: &Store, g: GrantArgs) -> anyhow::Result<()> {
    let amount: NanoUsd = g.usd.parse()?;
    let account = store.account(&account_ref(&g.account)?).await?;
    let reference = g
        .reference
        .unwrap_or_else(|| format!("adjustment:{}", hex::encode(rand::random::<[u8; 12]>())));
    let reason = g.reason.unwrap_or_else(|| "operator grant".into());
    let entry = store
        .append_ledger(&NewLedgerEntry {
            account_id: account.id,
            kind: LedgerKind::Adjustment,
            amount,
            external_ref: reference,
            actor: Some(actor()),
            reason: Some(reason),
        })
        .await?;
    let proof = store.balance_proof(account.id).await?;
    println!(
        "{} {} for account {} {} (ledger entry {}, ref {}); balance now {}",
        if amount.is_negative() {
            "removed"
        } else {
            "granted"
        },
        if amount.is_negative() {
            amount.checked_neg()?
        } else {
            amount
        },
        account.id,
        account.email,
        entry.id,
        entry.external_ref,
        proof.cached
    );
    Ok(())
}

async fn upstream_credit(store: &Store, cmd: UpstreamCreditCmd) -> anyhow::Result<()> {
    match cmd {
        UpstreamCreditCmd::Add {
            provider,
            usd,
            reference,
            note,
        } => {
            let amount: NanoUsd = usd.parse()?;
            let c = store
                .add_upstream_credit(&provider, amount, &reference, note.as_deref(), &actor())
                .await?;
            let left = store
                .provider_credits()
                .await?
                .into_iter()
                .find(|p| p.provider == provider)
                .map(|p| p.remaining.to_string())
                .unwrap_or_default();
            println!(
                "recorded {} for {} (entry {}, ref {}); prepaid credit left {left}",
                c.amount, c.provider, c.id, c.reference
            );
        }
        UpstreamCreditCmd::List => {
            let credits = store.provider_credits().await?;
            if credits.is_empty() {
                println!("no prepaid upstream credit recorded");
                return Ok(());
            }
            println!(
                "{:<16} {:>16} {:>16} {:>16} {:>14} {:>10}",
                "PROVIDER", "PREPAID", "SPENT", "LEFT", "PER DAY (7D)", "DAYS LEFT"
            );
            for c in &credits {
                println!(
                    "{:<16} {:>16} {:>16} {:>16} {:>14} {:>10}",
                    c.provider,
                    c.credited.to_string(),
                    c.spent.to_string(),
                    c.remaining.to_string(),
                    c.per_day().map(|d| d.to_string()).unwrap_or_default(),
                    c.days_left()
                        .map(|d| format!("{d:.1}"))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            println!();
            for c in store.upstream_credits().await? {
                println!(
                    "{}  {:<16} {:>14}  ref {}{}",
                    crate::time::format_utc(c.created_at),
                    c.provider,
                    c.amount.to_string(),
                    c.reference,
                    c.note.map(|n| format!("  ({n})")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

async fn key(store: &Store, cmd: KeyCmd) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::Create(k) => {
            let account = store.account(&account_ref(&k.account)?).await?;
            let material = crate::keys::generate();
            let now = crate::time::now_ms();
            let new = NewKey {
                account_id: account.id,
                name: k.name,
                expires_at: k.expires_in_days.map(|d| now + i64::from(d) * 86_400_000),
                limits: LimitOverrides {
                    requests_per_minute: k.requests_per_minute,
                    tokens_per_minute: k.tokens_per_minute,
                    in_flight: k.in_flight,
                },
                spend_cap: k.spend_cap_usd.map(|s| s.parse()).transpose()?,
                allowed_models: k.models,
            };
            let key = store
                .create_key(&new, &material.hash, &material.display_prefix)
                .await?;
            eprintln!(
                "created key {} {:?} for account {} {} (shown as {}…)",
                key.id, key.name, account.id, account.email, key.display_prefix
            );
            if !account.is_verified() {
                eprintln!(
                    "note: the account's e-mail is not verified; the gateway refuses its keys until it is"
                );
            }
            eprintln!("This is the only time the key is shown; only its hash is stored:");
            println!("{}", material.plaintext.expose());
        }
        KeyCmd::List { account } => {
            let account = store.account(&account_ref(&account)?).await?;
            let keys = store.list_keys(account.id).await?;
            println!(
                "{:>6}  {:<20} {:<20} {:<9} {:<22} EXPIRES",
                "ID", "PREFIX", "NAME", "STATUS", "LAST USED"
            );
            for k in keys {
                println!(
                    "{:>6}  {:<20} {:<20} {:<9} {:<22} {}",
                    k.id,
                    format!("{}…", k.display_prefix),
                    k.name,
                    k.status.as_str(),
                    time(k.last_used_at),
                    time(k.expires_at)
                );
            }
        }
        KeyCmd::Revoke { key_id, reason } => {
            let key = store
                .revoke_key(key_id, &actor(), reason.as_deref())
                .await?;
            println!("key {} ({}…) is revoked", key.id, key.display_prefix);
        }
    }
    Ok(())
}

async fn balance(store: &Store, account: &str) -> anyhow::Result<()> {
    let a = store.account(&account_ref(account)?).await?;
    let p = store.balance_proof(a.id).await?;
    println!("account     {} {}", a.id, a.email);
    println!("balance     {}", p.cached);
    if p.leased.is_positive() {
        println!(
            "  leased    {} (held by gateway nodes for requests; returned when idle)",
            p.leased
        );
    }
    println!("ledger sum  {} over {} entries", p.ledger_sum, p.entries);
    if p.holds() {
        println!("proof       ok: the balance equals the ledger sum");
        Ok(())
    } else {
        bail!(
            "the cached balance {} differs from the ledger sum {}",
            p.cached,
            p.ledger_sum
        )
    }
}

async fn leases(conf: &Conf, store: &Store, cmd: LeasesCmd) -> anyhow::Result<()> {
    let now = crate::time::now_ms();
    let expiry_ms = conf.gateway.lease_expiry.as_millis() as i64;
    match cmd {
        LeasesCmd::List { accounts } => {
            let instances = store.instances().await?;
            if instances.is_empty() {
                println!("no gateway instances and no leases");
                return Ok(());
            }
            println!(
                "{:<44} {:<14} {:>7} {:>16}  STATE",
                "INSTANCE", "HEARTBEAT", "LEASES", "LEASED"
            );
            for i in &instances {
                let (age, state) = match i.heartbeat_at {
                    Some(at) if now - at < expiry_ms => {
                        (format!("{}s ago", (now - at) / 1000), "alive")
                    }
                    Some(at) => (format!("{}s ago", (now - at) / 1000), "gone (swept soon)"),
                    None => ("-".into(), "gone (no instance row)"),
                };
                println!(
                    "{:<44} {:<14} {:>7} {:>16}  {state}",
                    i.instance_id,
                    age,
                    i.leases,
                    i.leased.to_string()
                );
            }
            if accounts {
                println!();
                println!(
                    "{:<44} {:>10} {:>16}  UPDATED",
                    "INSTANCE", "ACCOUNT", "LEASED"
                );
                for l in store.leases().await? {
                    println!(
                        "{:<44} {:>10} {:>16}  {}",
                        l.instance_id,
                        l.account_id,
                        l.amount.to_string(),
                        crate::time::format_utc(l.updated_at)
                    );
                }
            }
            Ok(())
        }
        LeasesCmd::Release { instance, force } => {
            match store
                .release_instance(&instance, now, expiry_ms, force)
                .await?
            {
                crate::store::Released::Returned { leases, total } => {
                    println!(
                        "released {leases} lease(s) of {instance}: {total} back to the balances"
                    );
                    Ok(())
                }
                crate::store::Released::Unknown => bail!(
                    "no gateway instance or lease holder is named {instance:?}; nothing changed (see `duang-admin leases list`)"
                ),
                crate::store::Released::Alive { age_ms } => bail!(
                    "{instance} renewed its heartbeat {}s ago: it is running and spending these leases, so nothing changed. Stop it (it returns its leases on SIGTERM), or wait {}s after it stopped; --force releases anyway",
                    age_ms / 1000,
                    expiry_ms / 1000
                ),
            }
        }
    }
}

/// The process's shutdown signal: Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// `duang-admin reload`: asks each gateway (over its metrics listener) and the admin server
/// (with a token signed by the admin's key, valid for a minute) to reread the conf, and prints
/// each answer; fails when any process refused or could not be reached.
async fn reload(
    conf: &Conf,
    signing_key: &str,
    gateways: Vec<String>,
    admin: Option<Option<String>>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let gateways = if gateways.is_empty() {
        vec![conf.gateway.metrics_listen.to_string()]
    } else {
        gateways
    };
    let mut asks: Vec<(String, reqwest::RequestBuilder)> = gateways
        .iter()
        .map(|g| {
            let url = format!("http://{g}/-/reload");
            (format!("gateway {g}"), client.post(url))
        })
        .collect();
    if let Some(admin) = admin {
        let base = admin.unwrap_or_else(|| format!("http://{}", conf.admin.listen));
        let token = crate::admin::signing::Signer::new(signing_key.as_bytes()).link_token(
            crate::admin::server::RELOAD_TOKEN_PURPOSE,
            0,
            crate::time::now_ms() + 60_000,
            "",
        );
        let url = format!("{}/-/reload", base.trim_end_matches('/'));
        asks.push((format!("admin {base}"), client.post(url).bearer_auth(token)));
    }
    let mut failed = 0;
    for (who, ask) in asks {
        match ask.send().await {
            Err(e) => {
                failed += 1;
                println!("{who}: unreachable ({e})");
            }
            Ok(resp) => {
                let code = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                if code.is_success() {
                    println!("{who}: reloaded");
                    for w in body["warnings"].as_array().into_iter().flatten() {
                        println!("  warning: {}", w.as_str().unwrap_or_default());
                    }
                } else {
                    failed += 1;
                    let reason = body["reason"].as_str().unwrap_or("no reason given");
                    println!("{who}: refused ({code}): {reason}");
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} process(es) did not reload; the ones that refused keep their running conf");
    }
    Ok(())
}
