//! The admin (control plane): the operator CLI ([`cli`]) and the HTTP server ([`server`]): the
//! dashboard pages and the JSON API for customers, accounts and keys.

mod account;
pub mod cli;
mod credits;
mod csv;
mod dashboard;
mod demo;
mod error;
pub mod exports;
mod keys_web;
mod limiter;
pub mod mail;
pub mod notify;
mod openapi;
mod operator;
mod pages;
mod policies;
mod refunds;
mod retention;
mod security;
pub mod server;
mod signing;
pub mod stripe;
mod totp;
pub mod upstream_credit;
mod usage;
mod web;
