//! The admin (control plane): the operator CLI ([`cli`]) and the HTTP server ([`server`]).

pub mod cli;
mod demo;
pub mod server;
