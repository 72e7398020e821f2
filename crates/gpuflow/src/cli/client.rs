//! A small HTTP client for the engine's API.

use std::time::Duration;

use anyhow::{Result, anyhow};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub struct Client {
    http: reqwest::Client,
    /// For the event feed: no overall timeout (it stays open), but a read timeout well past
    /// the engine's 15 s keep-alive, so a vanished engine is noticed.
    feed: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Server-sent events from `GET /v1/events`, as parsed messages.
pub type EventFeed = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Event>> + Send>>;

/// One message of the event feed: its type (`hello`, `progress`, `attempt_ended`...) and the
/// JSON of its `data:` line.
pub struct Event {
    pub kind: String,
    pub data: Value,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Result<Client> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let feed = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(45))
            .build()?;
        Ok(Client { http, feed, base: base.trim_end_matches('/').to_string(), token })
    }

    /// The engine address this client talks to.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let req = self.authorized(req);
        let response = req.send().await.map_err(|e| {
            anyhow!("cannot reach the engine at {}: {e} (is `gpuflow serve` running? set --server)", self.base)
        })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        let code = body["error"]["code"].as_str().unwrap_or("error");
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(anyhow!("{code}: {message}"));
        }
        Err(anyhow!("{code} ({}): {message}", status.as_u16()))
    }

    pub async fn submit(&self, pipeline: &str, input: Value, priority: i32, key: Option<&str>) -> Result<Value> {
        let body = json!({"pipeline": pipeline, "input": input, "priority": priority, "idempotency_key": key});
        self.send(self.http.post(format!("{}/v1/jobs", self.base)).json(&body)).await
    }

    /// `POST /v1/jobs/batch` with up to 1,000 job objects; the answer's `jobs` has one entry per job.
    pub async fn submit_batch(&self, jobs: &[Value]) -> Result<Value> {
        self.send(self.http.post(format!("{}/v1/jobs/batch", self.base)).json(&json!({"jobs": jobs}))).await
    }

    pub async fn job(&self, id: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/jobs/{id}", self.base))).await
    }

    pub async fn jobs(&self, state: Option<&str>, pipeline: Option<&str>, limit: u32) -> Result<Value> {
        let mut url = format!("{}/v1/jobs?limit={limit}", self.base);
        for (key, value) in [("state", state), ("pipeline", pipeline)] {
            if let Some(v) = value {
                url.push_str(&format!("&{key}={}", percent_encode(v)));
            }
        }
        self.send(self.http.get(url)).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Value> {
        self.send(self.http.post(format!("{}/v1/jobs/{id}/cancel", self.base))).await
    }

    pub async fn diagnosis(&self) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/diagnosis", self.base))).await
    }

    pub async fn reload(&self) -> Result<Value> {
        self.send(self.http.post(format!("{}/v1/reload", self.base))).await
    }

    pub async fn agents(&self) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/agents", self.base))).await
    }

    pub async fn resources(&self) -> Result<Value> {
        self.send(self.http.get(format!("{}/v1/resources", self.base))).await
    }

    /// Jobs whose id starts with `prefix`, newest first (at most `limit`).
    pub async fn jobs_by_id_prefix(&self, prefix: &str, limit: u32) -> Result<Value> {
        let url = format!("{}/v1/jobs?id_prefix={}&limit={limit}", self.base, percent_encode(prefix));
        self.send(self.http.get(url)).await
    }

    /// Jobs whose id ends with `short_id` (the 8 hex digits the CLI and the dashboard show).
    pub async fn jobs_by_short_id(&self, short_id: &str, limit: u32) -> Result<Value> {
        let url = format!("{}/v1/jobs?short_id={}&limit={limit}", self.base, percent_encode(short_id));
        self.send(self.http.get(url)).await
    }

    pub async fn retry(&self, id: &str) -> Result<Value> {
        self.send(self.http.post(format!("{}/v1/jobs/{id}/retry", self.base))).await
    }

    /// The last `tail_bytes` of an attempt's stdout or stderr (the latest attempt without one).
    pub async fn log(
        &self,
        id: &str,
        stage: &str,
        stream: &str,
        attempt: Option<u32>,
        tail_bytes: u64,
    ) -> Result<Value> {
        let mut url = format!(
            "{}/v1/jobs/{id}/stages/{}/log?stream={stream}&tail_bytes={tail_bytes}",
            self.base,
            percent_encode(stage)
        );
        if let Some(n) = attempt {
            url.push_str(&format!("&attempt={n}"));
        }
        self.send(self.http.get(url)).await
    }

    /// Opens the live feed. Messages published from now on arrive in order; `resync` says
    /// some were missed.
    pub async fn events(&self) -> Result<EventFeed> {
        let response =
            self.authorized(self.feed.get(format!("{}/v1/events", self.base))).send().await.map_err(|e| {
                anyhow!("cannot reach the engine at {}: {e} (is `gpuflow serve` running? set --server)", self.base)
            })?;
        let status = response.status();
        if !status.is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            return Err(anyhow!("the event feed answered {}: {message}", status.as_u16()));
        }
        let stream = response.bytes_stream().eventsource().map(|item| match item {
            Ok(e) => Ok(Event { kind: e.event, data: serde_json::from_str(&e.data).unwrap_or(Value::Null) }),
            Err(e) => Err(anyhow!("the event feed broke off: {e}")),
        });
        Ok(Box::pin(stream))
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
