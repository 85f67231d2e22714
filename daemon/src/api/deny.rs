//! `/v1/deny` (every set, counted) and `/v1/deny/{set}`: GET lists a set
//! (`?count_only=true`: its size and drops only), POST adds entries, PUT
//! replaces the whole set (a bouncer's reconcile), DELETE removes the
//! prefixes given or, with `"all": true`, flushes the set. Writers only
//! (the guard refuses others before the body is read); each request is one
//! bounded audit record.

use axum::{
    Json,
    extract::{ConnectInfo, Path as UrlPath, Query, State, rejection::JsonRejection},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};

use super::{Api, ApiError, Body, Caller};
use crate::{
    core::{ChangeError, Core, DenyChanged, DenySetView},
    denylist::{self, Entry},
    model::unix_now,
};

/// Largest body of a deny request: about a million prefixes.
pub const MAX_DENY_BODY: usize = 64 << 20;
/// Most entries one request may carry.
pub const MAX_DENY_ENTRIES: usize = 2 << 20;

/// One entry to add: a prefix (`ADDRESS` or `ADDRESS/LEN`; an IPv6 /64
/// bans a host's whole subnet) and, optionally, seconds until it expires.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyItem {
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
}

/// `POST`/`PUT /v1/deny/{set}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyEntries {
    pub entries: Vec<DenyItem>,
}

/// `DELETE /v1/deny/{set}`: the prefixes to remove, or all of them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyRemoval {
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyQuery {
    #[serde(default)]
    pub count_only: bool,
}

fn invalid(message: String) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// The entries, each checked; the first bad one is named by index.
fn entries(items: &[DenyItem]) -> Result<Vec<Entry>, ApiError> {
    if items.len() > MAX_DENY_ENTRIES {
        return Err(invalid(format!(
            "at most {MAX_DENY_ENTRIES} entries a request"
        )));
    }
    let now = unix_now();
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = denylist::parse_prefix(&item.prefix)
                .map_err(|e| invalid(format!("entries[{i}]: {e}")))?;
            let expires = match item.expires_in {
                None => None,
                Some(0) => {
                    return Err(invalid(format!(
                        "entries[{i}]: expires_in must be at least 1"
                    )));
                }
                Some(s) => Some(now.saturating_add(s)),
            };
            Ok(Entry { prefix, expires })
        })
        .collect()
}

fn what(verb: &str, set: &str, items: &[String]) -> String {
    let first = items.first().map(String::as_str).unwrap_or("-");
    format!("deny {verb} {set}: {} entries (first {first})", items.len())
}

pub(super) async fn list_sets(State(api): State<Api>) -> Json<Vec<DenySetView>> {
    Json(api.core.lock().await.deny_sets())
}

pub(super) async fn list(
    State(api): State<Api>,
    UrlPath(set): UrlPath<String>,
    Query(q): Query<DenyQuery>,
) -> Result<Json<DenySetView>, ApiError> {
    let view = api.core.lock().await.deny_list(&set, q.count_only);
    match view {
        Ok(v) => Ok(Json(v)),
        Err(crate::core::ChangeError::Config(e)) => Err(ApiError(StatusCode::NOT_FOUND, e)),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn add(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    UrlPath(set): UrlPath<String>,
    body: Result<Body<DenyEntries>, JsonRejection>,
) -> Result<Json<DenyChanged>, ApiError> {
    let Body(body) = body?;
    if body.entries.is_empty() {
        return Err(invalid("entries: nothing to add".into()));
    }
    write_entries(&api, &caller, "add", &set, &body.entries, Core::deny_add).await
}

pub(super) async fn replace(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    UrlPath(set): UrlPath<String>,
    body: Result<Body<DenyEntries>, JsonRejection>,
) -> Result<Json<DenyChanged>, ApiError> {
    let Body(body) = body?;
    write_entries(
        &api,
        &caller,
        "replace",
        &set,
        &body.entries,
        Core::deny_replace,
    )
    .await
}

/// Adds or replaces `items` in `set` as one audited write (labelled with
/// `verb`); an entry that does not parse is refused inside the write, so
/// the refusal is audited too.
async fn write_entries(
    api: &Api,
    caller: &Caller,
    verb: &str,
    set: &str,
    items: &[DenyItem],
    op: fn(&mut Core, &str, &[Entry]) -> Result<DenyChanged, ChangeError>,
) -> Result<Json<DenyChanged>, ApiError> {
    let prefixes: Vec<String> = items.iter().map(|e| e.prefix.clone()).collect();
    let label = what(verb, set, &prefixes);
    let parsed = entries(items);
    api.write(caller, &label, |core| {
        let parsed = parsed.map_err(|e| crate::core::ChangeError::Config(e.1))?;
        op(core, set, &parsed)
    })
    .await
    .map(Json)
}

pub(super) async fn remove(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    UrlPath(set): UrlPath<String>,
    body: Result<Body<DenyRemoval>, JsonRejection>,
) -> Result<Json<DenyChanged>, ApiError> {
    let Body(body) = body?;
    let label = if body.all {
        format!("deny flush {set}")
    } else {
        what("remove", &set, &body.prefixes)
    };
    let parsed: Result<Vec<_>, String> = body
        .prefixes
        .iter()
        .enumerate()
        .map(|(i, p)| denylist::parse_prefix(p).map_err(|e| format!("prefixes[{i}]: {e}")))
        .collect();
    api.write(&caller, &label, |core| {
        if body.all {
            return core.deny_flush(&set);
        }
        let parsed = parsed.map_err(crate::core::ChangeError::Config)?;
        core.deny_remove(&set, &parsed)
    })
    .await
    .map(Json)
}
