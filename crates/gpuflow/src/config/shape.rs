//! Errors in the file's shape (YAML syntax, unknown keys, wrong types), with hints for the
//! common mistakes, and all of them at once rather than the first.
//!
//! serde stops at the first error. To find the others, the part of the file that holds it (the
//! innermost key or list item) is set aside, replaced by spaces so that every other line and
//! column stays where it was, and the file is read again, until it reads or nothing is left to
//! set aside. A part set aside can make its mapping miss a required key; that error is not the
//! user's, so the mapping is set aside too and the error is not reported.

use std::collections::HashSet;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::ConfigError;

/// Most errors reported for one file; past that, fixing the first ones is the better next step.
const MAX_ERRORS: usize = 50;

/// The closest of `candidates` to `word`, when it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (strsim::damerau_levenshtein(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// `; did you mean `x`?` for a likely typo, or nothing.
pub fn suggestion<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(word, candidates).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default()
}

/// Reads `text` as `T`; on failure, every shape error found, in file order.
pub fn read<T: DeserializeOwned>(text: &str, label: &str) -> Result<T, Vec<ConfigError>> {
    let first = match serde_saphyr::from_str::<T>(text) {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    let mut errors = vec![convert(&first, text, label)];
    // A file that is not even YAML has one error: there is no outline to set parts aside by.
    if let Ok(root) = serde_saphyr::from_str::<Spanned<Node>>(text) {
        let outline = Outline::of(text, &root);
        errors.extend(more_errors::<T>(text, label, &outline, first));
    }
    errors.sort_by_key(|e| (e.line, e.column));
    let mut seen = HashSet::new();
    errors.retain(|e| seen.insert((e.line, e.column, e.message.clone())));
    errors.truncate(MAX_ERRORS);
    Err(errors)
}

fn more_errors<T: DeserializeOwned>(
    text: &str,
    label: &str,
    outline: &Outline,
    first: serde_saphyr::Error,
) -> Vec<ConfigError> {
    let mut found = Vec::new();
    let mut blanked = text.as_bytes().to_vec();
    let mut set_aside: Vec<usize> = Vec::new();
    // Keys suggested for misspelt ones, and where: the same mapping then lacks that key, which
    // is the same mistake, not another one.
    let mut suggested: Vec<(String, usize)> = suggestion_of(&first, text).into_iter().collect();
    let mut current = first;
    while found.len() < MAX_ERRORS {
        let target = outline.target(&current, offset_of(&current, text), &set_aside);
        let Some(target) = target.map(|t| outline.widen(t, &set_aside)) else { break };
        outline.blank(target, &mut blanked);
        set_aside.push(target);
        let Ok(rest) = std::str::from_utf8(&blanked) else { break };
        match serde_saphyr::from_str::<T>(rest) {
            Ok(_) => break,
            Err(e) => {
                // The mapping is set aside next either way.
                let ours = missing_key_we_removed(outline, &set_aside, &e, text);
                let misspelt = missing_key_misspelt(outline, &set_aside, &suggested, &e, text);
                if !ours && !misspelt {
                    found.push(convert(&e, text, label));
                }
                suggested.extend(suggestion_of(&e, text));
                current = e;
            }
        }
    }
    found
}

/// The missing key a mapping reports after that very key of it was set aside.
fn missing_key_we_removed(outline: &Outline, set_aside: &[usize], e: &serde_saphyr::Error, text: &str) -> bool {
    let serde_saphyr::Error::SerdeMissingField { field, .. } = e.without_snippet() else { return false };
    let Some(mapping) = outline.target(e, offset_of(e, text), set_aside) else { return false };
    set_aside
        .iter()
        .any(|&i| outline.parts[i].key.as_deref() == Some(*field) && outline.parts[i].parent == Some(mapping))
}

/// The key an unknown-key error suggests, and where that error is.
fn suggestion_of(e: &serde_saphyr::Error, text: &str) -> Option<(String, usize)> {
    let serde_saphyr::Error::SerdeUnknownField { field, expected, .. } = e.without_snippet() else { return None };
    let key = did_you_mean(field, expected.iter().copied())?;
    Some((key.to_string(), offset_of(e, text)?))
}

/// A missing key that an earlier error in the same mapping already suggested for a misspelt one.
fn missing_key_misspelt(
    outline: &Outline,
    set_aside: &[usize],
    suggested: &[(String, usize)],
    e: &serde_saphyr::Error,
    text: &str,
) -> bool {
    let serde_saphyr::Error::SerdeMissingField { field, .. } = e.without_snippet() else { return false };
    let Some(mapping) = outline.target(e, offset_of(e, text), set_aside) else {
        return false;
    };
    let part = &outline.parts[mapping];
    suggested.iter().any(|(key, at)| key == field && part.start <= *at && *at < part.end)
}

fn offset_of(e: &serde_saphyr::Error, text: &str) -> Option<usize> {
    let loc = e.location()?;
    if let Some(offset) = loc.span().byte_offset() {
        return Some(offset as usize);
    }
    // Lines and columns count from 1, columns in characters.
    let line = text.split_inclusive('\n').nth(loc.line().checked_sub(1)? as usize)?;
    let line_start = line.as_ptr() as usize - text.as_ptr() as usize;
    let column = line.char_indices().nth(loc.column().saturating_sub(1) as usize).map_or(line.len(), |(i, _)| i);
    Some(line_start + column)
}

/// One shape error as a `ConfigError`: the crate's message, a snippet of the file as written
/// (`text`, not the copy with parts set aside), and a hint where the mistake is a common one.
pub fn convert(e: &serde_saphyr::Error, text: &str, label: &str) -> ConfigError {
    let loc = e.location();
    let (line, column) = loc.map(|l| (l.line(), l.column())).unwrap_or((0, 0));
    let mut options = serde_saphyr::RenderOptions::default();
    options.snippets = serde_saphyr::SnippetMode::Off;
    let rendered = e.render_with_options(options);
    let mut message = super::strip_position(rendered.lines().next().unwrap_or_default()).to_string();
    // The plain message ends with its position, which our prefix already gives.
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    message.push_str(&snippet(text, label, line, column));
    if let Some(hint) = hint(e, text) {
        message.push_str("\n  = hint: ");
        message.push_str(&hint);
    }
    ConfigError { file: label.to_string(), line, column, field: String::new(), message }
}

/// The offending line and the one before it, with a caret under the column.
fn snippet(text: &str, label: &str, line: u64, column: u64) -> String {
    let Some(index) = (line as usize).checked_sub(1) else { return String::new() };
    let lines: Vec<&str> = text.lines().collect();
    let Some(at) = lines.get(index) else { return String::new() };
    let width = line.to_string().len();
    let pad = " ".repeat(width);
    let mut out = format!("\n{pad}--> {label}:{line}:{column}\n{pad} |");
    if index > 0 {
        out.push_str(&format!("\n{:>width$} | {}", line - 1, lines[index - 1]));
    }
    out.push_str(&format!("\n{line:>width$} | {at}\n{pad} | {}^", " ".repeat(column.saturating_sub(1) as usize)));
    out
}

fn hint(e: &serde_saphyr::Error, text: &str) -> Option<String> {
    match e.without_snippet() {
        serde_saphyr::Error::SerdeUnknownField { field, expected, .. } => {
            did_you_mean(field, expected.iter().copied()).map(|c| format!("did you mean `{c}`?"))
        }
        serde_saphyr::Error::SerdeUnknownVariant { variant, expected, .. } => {
            did_you_mean(variant, expected.iter().copied()).map(|c| format!("did you mean `{c}`?"))
        }
        serde_saphyr::Error::Unexpected { expected, .. } if expected.contains("sequence") => {
            let loc = e.location()?;
            let line = text.lines().nth(loc.line().checked_sub(1)? as usize)?;
            list_hint(line, loc.column() as usize)
        }
        serde_saphyr::Error::InvalidScalar { ty, .. } => {
            let kind = *ty;
            let loc = e.location()?;
            let line = text.lines().nth(loc.line().checked_sub(1)? as usize)?;
            let value: String = line.chars().skip(loc.column().saturating_sub(1) as usize).collect();
            let value = value.split(" #").next()?.split([',', '}', ']']).next()?.trim();
            match kind {
                "u8" | "u16" | "u32" | "u64" | "usize" => {
                    Some(format!("`{value}` is not a whole number; write one such as `3`"))
                }
                "i8" | "i16" | "i32" | "i64" | "isize" => {
                    Some(format!("`{value}` is not a whole number; write one such as `-3` or `3`"))
                }
                "f32" | "f64" => Some(format!("`{value}` is not a number; write one such as `1.5`")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `command: echo hello` → write a list, `command: ["echo", "hello"]`.
fn list_hint(line: &str, column: usize) -> Option<String> {
    let start = line.char_indices().nth(column.checked_sub(1)?).map(|(i, _)| i)?;
    let (before, value) = line.split_at(start);
    let key = before.trim_end().strip_suffix(':')?.trim().trim_start_matches("- ").trim_start_matches(['{', ' ']);
    let key = key.rsplit([',', '{']).next()?.trim();
    // Up to a comment, or in a flow mapping up to the next entry.
    let mut value = value.split(" #").next()?.trim();
    if before.contains('{') {
        value = value.split([',', '}', ']']).next()?.trim();
    }
    if value.is_empty() || value.starts_with(['{', '[', '"', '\'']) {
        return None;
    }
    let items: Vec<String> = if key == "command" {
        // An argv: each word is one argument, and no shell splits it later.
        value.split_whitespace().map(|w| format!("{w:?}")).collect()
    } else {
        vec![format!("{value:?}")]
    };
    let example = format!("{key}: [{}]", items.join(", "));
    Some(if key == "command" {
        format!("`command` is a list with one element per argument (nothing goes through a shell); write `{example}`")
    } else {
        format!("`{key}` is a list; write `{example}`")
    })
}

// ---- the outline: where each key and list item sits -------------------------------------

/// The file as a tree of keys and items, positions only.
enum Node {
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// A key with its value, or a list item: the bytes `start..end` set it aside whole.
struct Part {
    start: usize,
    end: usize,
    /// Where its value starts.
    value: usize,
    /// The part whose value holds this one (`None`: the top level).
    parent: Option<usize>,
    key: Option<String>,
    children: Vec<usize>,
}

struct Outline {
    parts: Vec<Part>,
    /// Where the top-level value starts.
    root: usize,
}

impl Outline {
    fn of(text: &str, root: &Spanned<Node>) -> Outline {
        let at = offset(&root.referenced).unwrap_or(0);
        let mut outline = Outline { parts: Vec::new(), root: at };
        outline.add_children(text, &root.value, at, text.len(), None);
        outline
    }

    /// Adds the children of the container starting at `at` whose text ends by `end`.
    fn add_children(&mut self, text: &str, node: &Node, at: usize, end: usize, parent: Option<usize>) {
        let bytes = text.as_bytes();
        let flow = matches!(bytes.get(at), Some(b'{' | b'['));
        // A flow container's last item ends at its closing bracket, not at the parent's end.
        let end = if flow { closing_bracket(bytes, at).unwrap_or(end) } else { end };
        let mut kids: Vec<(usize, usize, Option<String>, &Spanned<Node>)> = Vec::new();
        match node {
            Node::Scalar => return,
            Node::Map(entries) => {
                for (key, value) in entries {
                    let (Some(k), Some(v)) = (offset(&key.referenced), offset(&value.referenced)) else { return };
                    kids.push((k, v, Some(key.value.clone()), value));
                }
            }
            Node::Seq(items) => {
                for item in items {
                    let Some(v) = offset(&item.referenced) else { return };
                    let start = if flow { v } else { dash_before(bytes, v).unwrap_or(v) };
                    kids.push((start, v, None, item));
                }
            }
        }
        // Aliases and merges point elsewhere in the file: positions out of order mean the
        // outline cannot be trusted here, so this container is set aside only whole.
        if kids.windows(2).any(|w| w[0].0 >= w[1].0)
            || kids.iter().any(|k| k.0 < at.min(k.1) || k.1 >= end.max(k.0 + 1))
        {
            return;
        }
        let starts: Vec<usize> = kids.iter().map(|k| k.0).collect();
        for (i, (start, value, key, node)) in kids.into_iter().enumerate() {
            let part_end = starts.get(i + 1).copied().unwrap_or(end);
            let index = self.parts.len();
            self.parts.push(Part { start, end: part_end, value, parent, key, children: Vec::new() });
            if let Some(p) = parent {
                self.parts[p].children.push(index);
            }
            self.add_children(text, &node.value, value, part_end, Some(index));
        }
    }

    /// The part to set aside for error `e` at byte `at`.
    fn target(&self, e: &serde_saphyr::Error, at: Option<usize>, set_aside: &[usize]) -> Option<usize> {
        let at = at?;
        let live = |i: &usize| !set_aside.iter().any(|&s| self.is_within(*i, s));
        let containing = self.parts.iter().enumerate().filter(|(i, p)| live(i) && p.start <= at && at < p.end);
        match e.without_snippet() {
            // Reported at one of the keys of the mapping that lacks it (its last, or its first):
            // set aside that mapping; else the innermost one around that point without the key.
            serde_saphyr::Error::SerdeMissingField { field, .. } => {
                // Keys set aside count as absent: that is what the parser saw.
                let lacks = |p: &Part| {
                    let keys: Vec<Option<&str>> = p.children.iter().map(|c| self.parts[*c].key.as_deref()).collect();
                    let present = |c: &usize| !set_aside.contains(c) && self.parts[*c].key.as_deref() == Some(*field);
                    !keys.is_empty() && keys.iter().all(Option::is_some) && !p.children.iter().any(present)
                };
                let at_key = self.parts.iter().enumerate().find(|(i, p)| live(i) && p.start == at && p.key.is_some());
                if let Some(parent) = at_key.and_then(|(_, p)| p.parent)
                    && lacks(&self.parts[parent])
                {
                    return Some(parent);
                }
                return containing.filter(|(_, p)| lacks(p)).min_by_key(|(_, p)| p.end - p.start).map(|(i, _)| i);
            }
            // A wrong kind of container is reported where it starts, which is where its first
            // key does: set aside the container, not that key. The whole file being the wrong
            // kind leaves nothing to read.
            serde_saphyr::Error::SerdeInvalidType { .. } | serde_saphyr::Error::Unexpected { .. } => {
                if at == self.root {
                    return None;
                }
                if let Some((i, _)) = containing
                    .clone()
                    .filter(|(_, p)| p.value == at && !p.children.is_empty())
                    .min_by_key(|(_, p)| p.end - p.start)
                {
                    return Some(i);
                }
            }
            _ => {}
        }
        containing.min_by_key(|(_, p)| p.end - p.start).map(|(i, _)| i)
    }

    /// Setting aside the last part left in a container would leave it empty (often a new
    /// error of its own): set the container aside instead.
    fn widen(&self, mut target: usize, set_aside: &[usize]) -> usize {
        while let Some(parent) = self.parts[target].parent {
            let left = self.parts[parent].children.iter().filter(|c| **c != target && !set_aside.contains(c)).count();
            if left > 0 {
                break;
            }
            target = parent;
        }
        target
    }

    fn is_within(&self, mut part: usize, ancestor: usize) -> bool {
        loop {
            if part == ancestor {
                return true;
            }
            match self.parts[part].parent {
                Some(p) => part = p,
                None => return false,
            }
        }
    }

    /// Replaces the part with spaces, keeping line breaks so that all else keeps its position.
    fn blank(&self, part: usize, bytes: &mut [u8]) {
        let Part { start, end, .. } = self.parts[part];
        let end = end.min(bytes.len());
        for b in bytes.get_mut(start..end).unwrap_or_default() {
            if *b != b'\n' && *b != b'\r' {
                *b = b' ';
            }
        }
    }
}

fn offset(loc: &serde_saphyr::Location) -> Option<usize> {
    loc.span().byte_offset().map(|o| o as usize)
}

/// The `-` that introduces a block list item at `item`.
fn dash_before(bytes: &[u8], item: usize) -> Option<usize> {
    let mut i = item;
    while i > 0 {
        i -= 1;
        match bytes[i] {
            b' ' | b'\t' | b'\n' | b'\r' => continue,
            b'-' => return Some(i),
            _ => return None,
        }
    }
    None
}

/// The position of the bracket closing the flow container opened at `open`.
fn closing_bracket(bytes: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            b'"' if starts_scalar(bytes, i) => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'\'' if starts_scalar(bytes, i) => {
                i += 1;
                while i < bytes.len() && !(bytes[i] == b'\'' && bytes.get(i + 1) != Some(&b'\'')) {
                    i += if bytes[i] == b'\'' { 2 } else { 1 };
                }
            }
            b'#' if i > 0 && bytes[i - 1].is_ascii_whitespace() => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Whether a quote at `i` opens a quoted scalar rather than sitting inside a plain one.
fn starts_scalar(bytes: &[u8], i: usize) -> bool {
    bytes[..i].iter().rev().find(|b| !b.is_ascii_whitespace()).is_none_or(|b| matches!(b, b'{' | b'[' | b',' | b':'))
}
