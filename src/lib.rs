//! Duang Duang relay: a prepaid, OpenAI-compatible AI API gateway.
//!
//! Two binaries share this library and one conf file (`conf/duang.toml`):
//!
//! * `duang-gateway`, the data plane (Pingora): key auth, limits, holds, tier routing, streaming,
//!   billing.
//! * `duang-admin`, the control plane (Axum + the operator CLI): accounts, keys, credits, usage.
//!
//! The gateway's request flow, top to bottom:
//!
//! 1. parse and check the key ([`keys`]);
//! 2. limits;
//! 3. read and validate the body, map the tier ([`conf::Tier`]);
//! 4. hold credits;
//! 5. forward to an upstream;
//! 6. stream back, counting tokens;
//! 7. settle the hold and queue the usage record ([`store::UsageRecord`]).
//!
//! Shared foundations: [`conf`] (typed, validated conf), [`money`] (integer nano-USD),
//! [`store`] (one repository over SQLite or PostgreSQL), [`secret`] (values kept out of logs).

pub mod admin;
pub mod conf;
pub mod email;
pub mod gateway;
pub mod keys;
pub mod logging;
pub mod money;
pub mod password;
pub mod secret;
pub mod store;
pub mod time;
