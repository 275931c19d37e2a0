//! What a homeserver request can fail with, and which failures are worth retrying.

use std::time::{Duration, SystemTime};

use ruma::api::error::{
    Error as MatrixError, ErrorBody, ErrorKind, FromHttpResponseError, LimitExceededErrorData,
    RetryAfter, StandardErrorBody,
};

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("homeserver answered {status} {errcode}: {error}")]
    Status {
        status: u16,
        errcode: String,
        error: String,
        retry_after: Option<Duration>,
    },
    #[error("could not build the request: {0}")]
    Request(String),
    #[error("unexpected response: {0}")]
    Response(String),
}

/// Longest error message kept from a homeserver answer (it ends up in logs).
const MAX_ERROR_CHARS: usize = 200;

impl ClientError {
    /// Worth retrying: transport errors, timeouts, 5xx and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Http(e) => !e.is_builder(),
            ClientError::Status { status, .. } => *status == 429 || *status >= 500,
            ClientError::Request(_) | ClientError::Response(_) => false,
        }
    }

    /// The homeserver refused the request as forbidden (403).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, ClientError::Status { status: 403, .. })
    }

    /// The access token is not (or no longer) valid.
    pub fn is_unknown_token(&self) -> bool {
        matches!(self, ClientError::Status { status: 401, .. })
    }

    /// How long the homeserver asked us to wait (429 `retry_after_ms` or `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            ClientError::Http(e) => e.status().map(|s| s.as_u16()),
            ClientError::Request(_) | ClientError::Response(_) => None,
        }
    }

    /// From ruma's reading of an answer: a Matrix error (any status of 400 or more), or a
    /// success body that did not deserialise.
    pub(crate) fn from_ruma(what: &str, e: FromHttpResponseError<MatrixError>) -> Self {
        match e {
            FromHttpResponseError::Deserialization(d) => {
                ClientError::Response(format!("{what}: {d}"))
            }
            FromHttpResponseError::Server(e) => Self::from_matrix_error(e),
            other => ClientError::Response(format!("{what}: {other}")),
        }
    }

    fn from_matrix_error(e: MatrixError) -> Self {
        let status = e.status_code.as_u16();
        let (errcode, error, retry_after) = match e.body {
            ErrorBody::Standard(StandardErrorBody { kind, message, .. }) => {
                let retry = match &kind {
                    ErrorKind::LimitExceeded(LimitExceededErrorData {
                        retry_after: Some(r),
                        ..
                    }) => Some(match r {
                        RetryAfter::Delay(d) => *d,
                        RetryAfter::DateTime(t) => {
                            t.duration_since(SystemTime::now()).unwrap_or_default()
                        }
                    }),
                    _ => None,
                };
                (kind.errcode().to_string(), message, retry)
            }
            ErrorBody::Json(v) => (
                v.get("errcode")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_owned(),
                v.get("error")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_owned(),
                None,
            ),
            _ => (String::new(), String::new(), None),
        };
        ClientError::Status {
            status,
            errcode,
            error: error.chars().take(MAX_ERROR_CHARS).collect(),
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::api::EndpointError;

    fn answer(status: u16, body: &str) -> ClientError {
        let resp = http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(body.as_bytes())
            .unwrap();
        ClientError::from_matrix_error(MatrixError::from_http_response(resp))
    }

    #[test]
    fn error_classification() {
        let e = |status| ClientError::Status {
            status,
            errcode: String::new(),
            error: String::new(),
            retry_after: None,
        };
        assert!(e(500).is_transient());
        assert!(e(429).is_transient());
        assert!(!e(400).is_transient());
        assert!(!e(413).is_transient());
        assert!(e(401).is_unknown_token());
        assert!(e(403).is_forbidden());
        assert!(!ClientError::Response("x".into()).is_transient());
    }

    #[test]
    fn a_rate_limit_answer_carries_its_retry_delay() {
        let e = answer(
            429,
            r#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests","retry_after_ms":1500}"#,
        );
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert!(matches!(&e, ClientError::Status { errcode, .. } if errcode == "M_LIMIT_EXCEEDED"));
    }

    #[test]
    fn a_forbidden_answer_keeps_its_code_and_message() {
        let e = answer(403, r#"{"errcode":"M_FORBIDDEN","error":"not invited"}"#);
        assert!(e.is_forbidden() && !e.is_transient());
        match e {
            ClientError::Status { errcode, error, .. } => {
                assert_eq!(
                    (errcode.as_str(), error.as_str()),
                    ("M_FORBIDDEN", "not invited")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_garbled_error_body_still_gives_the_status() {
        let e = answer(502, "<html>bad gateway</html>");
        assert_eq!(e.status(), Some(502));
        assert!(e.is_transient());
    }
}
