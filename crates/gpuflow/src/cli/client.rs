//! A small HTTP client for the engine's API.

use anyhow::{Result, anyhow};
use reqwest::StatusCode;
use serde_json::{Value, json};

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Result<Client> {
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build()?;
        Ok(Client { http, base: base.trim_end_matches('/').to_string(), token })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
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
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
