//! A JSON request body parsed without tracking where each value is.
//!
//! `axum::Json` parses through `serde_path_to_error`, which keeps the path
//! of every value so that an error can name the one at fault: the whole
//! document pays for a message only a bad one needs (a 100k-rule body is
//! 13.7 MB). [`Body`] parses plainly first; a body that fails is parsed
//! again by `axum::Json`, whose rejection (status and message, the path
//! included) is what the caller gets, as before.

use axum::{
    Json,
    body::Bytes,
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::{HeaderMap, header},
};
use serde::de::DeserializeOwned;

/// A request body of JSON, as `axum::Json` accepts it.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = JsonRejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Any other content type (with a suffix, missing, wrong) is left
        // to `axum::Json`: it accepts or refuses it as it always did.
        if !plain_json(req.headers()) {
            let Json(value) = Json::<T>::from_request(req, state).await?;
            return Ok(Body(value));
        }
        let bytes = Bytes::from_request(req, state).await?;
        // `serde_json::from_slice` is what `Json::from_bytes` runs, less
        // the path tracking: the same documents parse, to the same values.
        match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(Body(value)),
            Err(_) => Json::<T>::from_bytes(&bytes).map(|Json(value)| Body(value)),
        }
    }
}

/// Whether the request's content type is `application/json` as the `mime`
/// crate parses it (parameters allowed), the test `axum::Json` makes, less
/// its `+json` suffixes: stricter, so whatever passes here `axum::Json`
/// would have taken, and the rest is left to it.
fn plain_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| m.type_() == mime::APPLICATION && m.subtype() == mime::JSON)
}

#[cfg(test)]
mod tests {
    use axum::{body::Body as HttpBody, http::StatusCode};
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Rule {
        id: String,
        ports: Vec<u16>,
    }

    async fn both(
        content_type: Option<&str>,
        body: &str,
    ) -> (
        Result<Vec<Rule>, (StatusCode, String)>,
        Result<Vec<Rule>, (StatusCode, String)>,
    ) {
        let request = || {
            let mut r = Request::builder().method("PUT").uri("/");
            if let Some(t) = content_type {
                r = r.header(header::CONTENT_TYPE, t);
            }
            r.body(HttpBody::from(body.to_string())).unwrap()
        };
        let ours = Body::<Vec<Rule>>::from_request(request(), &())
            .await
            .map(|Body(v)| v)
            .map_err(|e| (e.status(), e.body_text()));
        let axums = Json::<Vec<Rule>>::from_request(request(), &())
            .await
            .map(|Json(v)| v)
            .map_err(|e| (e.status(), e.body_text()));
        (ours, axums)
    }

    #[tokio::test]
    async fn bodies_are_accepted_and_refused_as_axum_json_does_with_its_messages() {
        let cases = [
            (Some("application/json"), r#"[{"id":"a","ports":[22,80]}]"#),
            (
                Some("Application/JSON; charset=utf-8"),
                r#"[{"id":"a","ports":[]}]"#,
            ),
            (
                Some("application/json"),
                r#"[{"id":"a","ports":[22,70000]}]"#,
            ),
            (
                Some("application/json"),
                r#"[{"id":"a","ports":[22],"extra":1}]"#,
            ),
            (
                Some("application/json"),
                r#"[{"id":"a","ports":[22]}] trailing"#,
            ),
            (Some("application/json"), r#"[{"id":"a","#),
            (Some("application/json"), ""),
            (
                Some("application/problem+json"),
                r#"[{"id":"a","ports":[1]}]"#,
            ),
            (Some("text/plain"), r#"[{"id":"a","ports":[1]}]"#),
            // What `mime` refuses, `axum::Json` does too (415).
            (
                Some("application/json ;charset=utf-8"),
                r#"[{"id":"a","ports":[1]}]"#,
            ),
            (
                Some("application/json; charset"),
                r#"[{"id":"a","ports":[1]}]"#,
            ),
            (Some("application/json "), r#"[{"id":"a","ports":[1]}]"#),
            (Some("application/jsonx"), r#"[{"id":"a","ports":[1]}]"#),
            (None, r#"[{"id":"a","ports":[1]}]"#),
        ];
        for (content_type, body) in cases {
            let (ours, axums) = both(content_type, body).await;
            assert_eq!(ours, axums, "{content_type:?} {body:?}");
        }
        // The path is in the message of a value at fault.
        let (ours, _) = both(
            Some("application/json"),
            r#"[{"id":"a","ports":[22,70000]}]"#,
        )
        .await;
        let (status, message) = ours.unwrap_err();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(message.contains("[0].ports[1]"), "{message}");
    }
}
