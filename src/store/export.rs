//! Reads that stream: large result sets (a CSV export of a year of usage, the ledger, the audit
//! log) handed out a few hundred rows at a time as the database sends them, so memory stays flat
//! whatever the number of rows. A task reads the query and passes batches through a small
//! bounded channel: a slow reader slows the query down instead of filling memory, and a reader
//! that goes away (a client that disconnects) stops it.

use super::StoreError;
use futures_util::StreamExt;
use sqlx::AnyPool;
use sqlx::any::AnyRow;
use std::pin::Pin;

/// Rows handed out together.
const BATCH: usize = 256;
/// Batches in flight between the query and its reader.
const DEPTH: usize = 4;

/// Batches of rows, in the query's order; an error ends it.
pub type RowStream<T> =
    Pin<Box<dyn futures_util::Stream<Item = Result<Vec<T>, StoreError>> + Send>>;

/// A bind value of a streamed query.
#[derive(Debug, Clone)]
pub(super) enum Arg {
    Int(i64),
    Text(String),
}

/// Runs `sql` with `args` and streams its rows mapped by `map`.
pub(super) fn stream_rows<T: Send + 'static>(
    pool: &AnyPool,
    sql: String,
    args: Vec<Arg>,
    map: fn(&AnyRow) -> Result<T, StoreError>,
) -> RowStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<T>, StoreError>>(DEPTH);
    let pool = pool.clone();
    tokio::spawn(async move {
        let mut q = sqlx::query(&sql);
        for a in &args {
            q = match a {
                Arg::Int(i) => q.bind(*i),
                Arg::Text(s) => q.bind(s.as_str()),
            };
        }
        let mut rows = q.fetch(&pool);
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(row) = rows.next().await {
            match row.map_err(StoreError::from).and_then(|r| map(&r)) {
                Ok(v) => batch.push(v),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            if batch.len() == BATCH
                && tx
                    .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                    .await
                    .is_err()
            {
                return;
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(batch)).await;
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}
