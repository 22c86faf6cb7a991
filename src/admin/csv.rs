//! CSV downloads, streamed: the header goes out at once and the rows follow in batches as the
//! store reads them (`store::RowStream`), so an export of any size costs the same memory. A
//! failure half-way ends the download early (the client sees a broken transfer, never a CSV that
//! looks complete), and is logged.

use crate::store::RowStream;
use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

/// One field, quoted when it could break a row, and defused when a spreadsheet would read it as
/// a formula.
pub fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Appends one row of fields and its line end.
pub fn push_row<S: AsRef<str>>(out: &mut String, fields: &[S]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&field(f.as_ref()));
    }
    out.push('\n');
}

/// A `text/csv` attachment named `filename`: `header` (a line, with its `\n`), then each row as
/// `line` writes it.
pub fn download<T: Send + 'static>(
    filename: &str,
    header: &'static str,
    rows: RowStream<T>,
    line: fn(&mut String, &T),
) -> Response {
    let body =
        futures_util::stream::once(async move { Ok(bytes::Bytes::from_static(header.as_bytes())) })
            .chain(rows.map(move |batch| match batch {
                Ok(batch) => {
                    let mut out = String::with_capacity(batch.len() * 160);
                    for r in &batch {
                        line(&mut out, r);
                    }
                    Ok(bytes::Bytes::from(out))
                }
                Err(e) => {
                    tracing::error!(error = %e, "a CSV export failed half-way");
                    Err(e)
                }
            }));
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
