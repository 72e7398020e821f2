//! Job ids as people type them: a whole id, the short id the CLI and the dashboard show (its
//! last 8 hex digits), or the start of an id; the engine looks them up over indexes.

use anyhow::{Result, bail};
use serde_json::Value;

use super::human::SHORT_ID;
use super::{Client, s};

/// How many candidates an ambiguous id lists.
const CANDIDATES: u32 = 10;

/// The whole id of the one job that `typed` names.
pub async fn resolve(client: &Client, typed: &str) -> Result<String> {
    if let Ok(whole) = uuid::Uuid::try_parse(typed) {
        // As stored: hyphenated lowercase, whichever form was typed.
        return Ok(whole.to_string());
    }
    if crate::store::IdPrefix::parse(typed).is_none() {
        bail!(
            "job id `{typed}` is not a job id; give a whole id, the short id `gpuflow jobs` and the dashboard show, or the first characters of an id (hex digits)"
        );
    }
    // One more than listed, to say whether there are more.
    if typed.len() == SHORT_ID && !typed.contains('-') {
        let found = jobs(client.jobs_by_short_id(typed, CANDIDATES + 1).await?);
        if !found.is_empty() {
            return one(typed, "end with", found);
        }
    }
    let found = jobs(client.jobs_by_id_prefix(typed, CANDIDATES + 1).await?);
    if found.is_empty() {
        bail!("no job id starts or ends with `{typed}`; `gpuflow jobs` lists the latest jobs and their short ids");
    }
    one(typed, "start with", found)
}

fn jobs(answer: Value) -> Vec<Value> {
    answer["jobs"].as_array().cloned().unwrap_or_default()
}

fn one(typed: &str, how: &str, found: Vec<Value>) -> Result<String> {
    if let [only] = found.as_slice() {
        return Ok(s(&only["id"]));
    }
    let listed: Vec<String> = found
        .iter()
        .take(CANDIDATES as usize)
        .map(|j| format!("  {}  {}  {}  {}", s(&j["id"]), s(&j["pipeline"]), s(&j["state"]), s(&j["created_at"])))
        .collect();
    let (count, more) = if found.len() > CANDIDATES as usize {
        (format!("more than {CANDIDATES}"), "\n  ...")
    } else {
        (found.len().to_string(), "")
    };
    bail!("job id `{typed}` is ambiguous: {count} job ids {how} it; give more of the id:\n{}{more}", listed.join("\n"))
}
