//! Progress of a command stage: the stage appends lines to the file named by
//! `$GPUFLOW_PROGRESS`, and the attempt's own task reads the new lines every
//! `PROGRESS_POLL` (never the loop: file IO stays off it).
//!
//! A line is either `FRACTION [MESSAGE]` (`0.4 frame 10/25`, `40% frame 10/25`) or a JSON
//! object (`{"fraction": 0.4, "message": "frame 10/25"}`, either key optional). Only the
//! newest valid line of each read counts. Bad lines are skipped with a debug log; a stage
//! cannot make the engine fail, wait or hold much memory through this file.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How often the file is checked for new lines while the stage runs.
pub const PROGRESS_POLL: Duration = Duration::from_millis(250);
/// The most read per check; when the file grew by more, only its newest part is read
/// (older lines would be superseded anyway).
const READ_MAX: u64 = 64 * 1024;
/// A line longer than this is skipped.
const LINE_MAX: usize = 4 * 1024;
/// Messages are cut to this many characters.
pub const MESSAGE_MAX_CHARS: usize = 200;

/// One progress report: how much is done and/or a short status.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// In [0, 1].
    pub fraction: Option<f64>,
    pub message: Option<String>,
}

impl Progress {
    /// From a JSON object with optional `fraction` (a number in [0, 1]) and `message` (a
    /// string); a report with neither, or with a wrong one, is refused with the reason.
    pub fn from_json(value: &Value) -> Result<Progress, String> {
        let Some(object) = value.as_object() else { return Err(format!("not a JSON object: {value}")) };
        let fraction = match object.get("fraction") {
            None | Some(Value::Null) => None,
            Some(v) => Some(fraction_of(v.as_f64().ok_or_else(|| format!("fraction: `{v}` is not a number"))?)?),
        };
        let message = match object.get("message") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) => Some(short(m)),
            Some(v) => return Err(format!("message: `{v}` is not a string")),
        };
        if fraction.is_none() && message.is_none() {
            return Err("neither `fraction` nor `message`".into());
        }
        Ok(Progress { fraction, message })
    }

    /// One line of a progress file (see the module doc).
    pub fn parse_line(line: &str) -> Result<Progress, String> {
        let line = line.trim();
        if line.starts_with('{') {
            let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
            return Progress::from_json(&value);
        }
        let (head, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let fraction = match head.strip_suffix('%') {
            Some(pct) => pct.parse::<f64>().map(|p| p / 100.0),
            None => head.parse::<f64>(),
        }
        .map_err(|_| format!("`{head}` is not a fraction (0 to 1) or a percentage; write e.g. `0.4 frame 10/25`"))?;
        let fraction = fraction_of(fraction)?;
        let rest = rest.trim();
        Ok(Progress { fraction: Some(fraction), message: (!rest.is_empty()).then(|| short(rest)) })
    }
}

fn fraction_of(f: f64) -> Result<f64, String> {
    if f.is_finite() && (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("fraction `{f}` is out of range; use 0 to 1 (or 0% to 100%)"))
    }
}

fn short(message: &str) -> String {
    match message.char_indices().nth(MESSAGE_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message.to_string(),
    }
}

/// Follows one attempt's progress file from where the last check stopped.
pub struct ProgressTail {
    path: PathBuf,
    offset: u64,
    /// The start of a line not yet ended by a newline.
    partial: Vec<u8>,
    /// The current line is longer than `LINE_MAX`: drop bytes until its end.
    skipping: bool,
}

impl ProgressTail {
    /// Removes a file left by an earlier run under the same name, so its lines are not
    /// taken for this attempt's.
    pub async fn start(path: PathBuf) -> ProgressTail {
        let _ = tokio::fs::remove_file(&path).await;
        ProgressTail { path, offset: 0, partial: Vec::new(), skipping: false }
    }

    /// The newest valid report among the lines completed since the last call, if any. A
    /// missing file is no report yet; a file that shrank was rewritten and is read anew.
    pub async fn poll(&mut self) -> Option<Progress> {
        // Most polls find nothing new. A plain stat, done inline (microseconds on a local
        // disk), answers those without the trips to tokio's blocking pool that opening the
        // file takes: with 100 stages running, those trips cost the engine 4 % of a core.
        if std::fs::metadata(&self.path).ok()?.len() == self.offset {
            return None;
        }
        let mut file = tokio::fs::File::open(&self.path).await.ok()?;
        let size = file.metadata().await.ok()?.len();
        if size < self.offset {
            self.offset = 0;
            self.partial.clear();
            self.skipping = false;
        }
        if size == self.offset {
            return None;
        }
        if size - self.offset > READ_MAX {
            // Too far behind: jump to the newest part; its first line may be cut, skip it.
            self.offset = size - READ_MAX;
            self.partial.clear();
            self.skipping = true;
        }
        file.seek(std::io::SeekFrom::Start(self.offset)).await.ok()?;
        let mut bytes = Vec::with_capacity((size - self.offset) as usize);
        file.take(size - self.offset).read_to_end(&mut bytes).await.ok()?;
        self.offset += bytes.len() as u64;
        self.take(&bytes)
    }

    /// Splits new bytes into lines and keeps the newest valid report.
    fn take(&mut self, bytes: &[u8]) -> Option<Progress> {
        let mut newest = None;
        let mut pieces = bytes.split(|b| *b == b'\n').peekable();
        while let Some(piece) = pieces.next() {
            // Every piece but the last was ended by a newline.
            let ended = pieces.peek().is_some();
            if !self.skipping {
                self.partial.extend_from_slice(piece);
                if self.partial.len() > LINE_MAX {
                    tracing::debug!(file = %self.path.display(), "progress line longer than {LINE_MAX} bytes skipped");
                    self.partial.clear();
                    self.skipping = true;
                }
            }
            if !ended {
                break;
            }
            if self.skipping {
                self.skipping = false;
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            match Progress::parse_line(&text) {
                Ok(p) => newest = Some(p),
                Err(e) => tracing::debug!(file = %self.path.display(), "progress line skipped: {e}"),
            }
        }
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(fraction: Option<f64>, message: Option<&str>) -> Progress {
        Progress { fraction, message: message.map(str::to_string) }
    }

    #[test]
    fn lines_are_read_as_fraction_and_message_or_json() {
        assert_eq!(Progress::parse_line("0.4 frame 10/25").unwrap(), p(Some(0.4), Some("frame 10/25")));
        assert_eq!(Progress::parse_line("  1\n").unwrap(), p(Some(1.0), None));
        assert_eq!(Progress::parse_line("40% frame 10/25").unwrap(), p(Some(0.4), Some("frame 10/25")));
        assert_eq!(Progress::parse_line(r#"{"message": "loading"}"#).unwrap(), p(None, Some("loading")));
        assert_eq!(Progress::parse_line(r#"{"fraction": 0, "message": null}"#).unwrap(), p(Some(0.0), None));
        for bad in ["frame 10", "1.5 too far", "-0.1", "NaN", "{\"fraction\": 2}", "{}", "{\"message\": 3}", "{oops"] {
            assert!(Progress::parse_line(bad).is_err(), "{bad} should be refused");
        }
        let long = "x".repeat(500);
        let m = Progress::parse_line(&format!("0.5 {long}")).unwrap().message.unwrap();
        assert_eq!(m.chars().count(), MESSAGE_MAX_CHARS + 1, "cut, with an ellipsis");
    }

    #[tokio::test]
    async fn the_tail_reads_only_new_complete_lines_and_keeps_the_newest_valid_one() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.1.progress");
        std::fs::write(&path, "0.9 stale, from an earlier run\n").unwrap();
        let mut tail = ProgressTail::start(path.clone()).await;
        assert!(!path.exists(), "a stale file is removed");
        assert_eq!(tail.poll().await, None, "no file yet");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        write!(f, "0.1 one\nnot progress\n0.2 two\n0.3 thr").unwrap();
        assert_eq!(tail.poll().await, Some(p(Some(0.2), Some("two"))), "a bad line is skipped, the cut one waits");
        assert_eq!(tail.poll().await, None, "nothing new");
        writeln!(f, "ee").unwrap();
        assert_eq!(tail.poll().await, Some(p(Some(0.3), Some("three"))));
        // A line over the limit is dropped whole, the next one counts.
        write!(f, "0.4 {}\n0.5 after\n", "y".repeat(LINE_MAX * 2)).unwrap();
        assert_eq!(tail.poll().await, Some(p(Some(0.5), Some("after"))));
        // Far behind: only the newest part is read.
        let many: String = (0..20_000).map(|i| format!("0.{} line {i}\n", i % 10)).collect();
        writeln!(f, "{many}0.99 last").unwrap();
        assert_eq!(tail.poll().await, Some(p(Some(0.99), Some("last"))));
        // Rewritten from the start (`>` instead of `>>`).
        drop(f);
        std::fs::write(&path, "0.6 rewritten\n").unwrap();
        assert_eq!(tail.poll().await, Some(p(Some(0.6), Some("rewritten"))));
    }
}
