//! Graceful shutdown. On SIGTERM or Ctrl-C (SIGINT) the gateway:
//!
//! 1. stops accepting connections (Pingora's listeners close; idle kept-alive client connections
//!    are closed; `/healthz` answers 503 `draining` to the load balancer);
//! 2. lets requests and streams in flight finish, for up to `gateway.graceful_shutdown_timeout_ms`;
//! 3. at that deadline, ends every stream still open with an SSE error event (`server_shutting_down`),
//!    billed for what was delivered;
//! 4. writes every settled usage record (the writer drains its queue and the journal);
//! 5. returns its credit leases, then exits.
//!
//! Pingora's own grace period is a fixed sleep followed by a runtime shutdown that drops every
//! task at its next await, so it cannot be used to wait for streams: the process instead exits
//! from `main` as soon as the worker reports step 5 done ([`Drain::wait_done`]), and Pingora's
//! grace period is only the backstop (the deadline plus [`FLUSH_MARGIN`]).

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// After the deadline, how long writing usage and returning leases may take before Pingora's
/// backstop ends the process anyway (a store that does not answer; what is unwritten stays in the
/// journal for the next start).
pub const FLUSH_MARGIN: Duration = Duration::from_secs(10);

/// A one-way switch that async code can wait for.
#[derive(Default)]
pub struct Flag {
    set: AtomicBool,
    notify: Notify,
}

impl Flag {
    pub fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the flag is set (at once if it already is).
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the check, so a `set` in between is not missed.
        notified.as_mut().enable();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}

#[derive(Default)]
pub struct Drain {
    /// A shutdown signal has arrived.
    pub draining: Flag,
    /// The deadline has passed: open streams end now.
    pub cut: Flag,
    /// Requests are all done: the usage writer writes what is queued and stops.
    pub flush: Flag,
    /// Everything written and returned: the process may exit.
    done: Mutex<bool>,
    done_cv: Condvar,
}

impl Drain {
    pub fn finish(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *done = true;
        self.done_cv.notify_all();
    }

    /// Blocks the calling (non-async) thread until [`finish`](Self::finish).
    pub fn wait_done(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.done_cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The signals Pingora's server waits for: SIGTERM and SIGINT both drain (a terminal's Ctrl-C
/// reaches `duang-admin up`'s gateway child too, and must not cut its streams); SIGQUIT keeps
/// Pingora's zero-downtime upgrade (listening sockets handed to a new process, then a drain).
pub struct Signals {
    pub drain: Arc<Drain>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = quit.recv() => "SIGQUIT",
        };
        tracing::info!(
            signal = which,
            "draining: no new connections; requests in flight may finish"
        );
        self.drain.draining.set();
        if which == "SIGQUIT" {
            ShutdownSignal::GracefulUpgrade
        } else {
            ShutdownSignal::GracefulTerminate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_reaches_streams_waiting_and_streams_that_come_later() {
        let d = Arc::new(Drain::default());
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.cut.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        d.cut.set();
        waiting.await.expect("woken");
        // A stream that starts waiting after the cut does not wait.
        d.cut.wait().await;
        assert!(!d.flush.is_set() && !d.draining.is_set());
    }
}
