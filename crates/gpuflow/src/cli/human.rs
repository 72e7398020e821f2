//! What the CLI prints for people: sizes in binary units, durations, resource needs in words,
//! short job ids and fixed-width tables.

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use serde_json::Value;

/// Sizes and short job ids read as the engine's own sentences write them.
pub use gpuflow_core::waiting::{SHORT_ID, bytes, short_id};

/// `850 ms`, `12.3 s`, `4 min 10 s`, `2 h 5 min`.
pub fn duration_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => {
            let s = format!("{:.1}", ms as f64 / 1000.0);
            format!("{} s", s.strip_suffix(".0").unwrap_or(&s))
        }
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn count(n: u64, one: &str, many: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

/// A stage's needs (`NeedsView`) in words: `needs 1 GPU`, `needs 6 GiB GPU memory, 2 CPU`.
pub fn needs(needs: &Value) -> String {
    let mut parts = Vec::new();
    let n = |key: &str| needs[key].as_u64().unwrap_or(0);
    if n("gpu") > 0 {
        parts.push(count(n("gpu"), "GPU", "GPUs"));
    }
    if n("gpu_memory_bytes") > 0 {
        parts.push(format!("{} GPU memory", bytes(n("gpu_memory_bytes"))));
    }
    if n("cpu") > 0 {
        parts.push(format!("{} CPU", n("cpu")));
    }
    for (name, amount) in needs["counters"].as_object().into_iter().flatten() {
        parts.push(format!("{} {name}", amount.as_u64().unwrap_or(0)));
    }
    if parts.is_empty() { "needs nothing".to_string() } else { format!("needs {}", parts.join(", ")) }
}

/// What a lease (`LeaseView`) holds: `GPU 0`, `6 GiB of GPU 0, 2 CPU`.
pub fn holds(lease: &Value) -> String {
    let mut parts = Vec::new();
    let gpus: Vec<String> = lease["gpus"].as_array().into_iter().flatten().map(super::s).collect();
    match gpus.len() {
        0 => {}
        1 => parts.push(format!("GPU {}", gpus[0])),
        _ => parts.push(format!("GPUs {}", gpus.join(", "))),
    }
    if let Some(share) = lease["gpu_memory"].as_object() {
        let size = bytes(share.get("bytes").and_then(Value::as_u64).unwrap_or(0));
        parts.push(format!("{size} of GPU {}", share.get("device").map(super::s).unwrap_or_default()));
    }
    if let Some(cpu) = lease["cpu"].as_u64().filter(|c| *c > 0) {
        parts.push(format!("{cpu} CPU"));
    }
    for (name, amount) in lease["counters"].as_object().into_iter().flatten() {
        parts.push(format!("{} {name}", amount.as_u64().unwrap_or(0)));
    }
    if parts.is_empty() { "nothing".to_string() } else { parts.join(", ") }
}

/// A table without borders whose columns are as wide as their widest cell; numeric columns
/// (by index) are right-aligned.
pub fn table(header: &[&str], right_aligned: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(header);
    // Two spaces between columns and none before the first, as `ls -l` and `ps` print.
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    for &i in right_aligned {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Prints a table with its trailing spaces trimmed (comfy-table pads the last column).
pub fn print_table(table: &Table) {
    for line in table.lines() {
        println!("{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sizes_durations_and_needs_read_as_words() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(16 << 30), "16 GiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(bytes(512 << 20), "512 MiB");
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(12_340), "12.3 s");
        assert_eq!(duration_ms(250_000), "4 min 10 s");
        assert_eq!(needs(&json!({"gpu": 1, "gpu_memory_bytes": 0, "cpu": 0, "counters": {}})), "needs 1 GPU");
        assert_eq!(
            needs(&json!({"gpu": 1, "gpu_memory_bytes": 6u64 << 30, "cpu": 2, "counters": {"licences": 1}})),
            "needs 1 GPU, 6 GiB GPU memory, 2 CPU, 1 licences"
        );
        assert_eq!(
            holds(&json!({"gpus": [], "gpu_memory": {"device": 0, "bytes": 6u64 << 30}, "cpu": 1, "counters": {}})),
            "6 GiB of GPU 0, 1 CPU"
        );
        assert_eq!(short_id("0193b5f2-7c1e-7d3a-9f00-1234567890ab"), "567890ab");
    }
}
