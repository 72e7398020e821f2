//! Argument templates: `{input.video}`, `{stages.detect.box}`, `{job.dir}`, `{job.id}`.
//! `{{` and `}}` stand for literal braces. A template only ever produces one argv element, so
//! a value with spaces or shell syntax in it stays one argument: nothing goes through a shell.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
pub enum Reference {
    Input(Vec<String>),
    Stage { index: usize, name: String, path: Vec<String> },
    JobDir,
    JobId,
}

#[derive(Clone, Debug, PartialEq)]
enum Segment {
    Literal(String),
    Reference(Reference),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    segments: Vec<Segment>,
}

/// What a template reads when it is rendered.
pub struct RenderContext<'a> {
    pub input: &'a Value,
    /// Outputs of the pipeline's stages, by position (`None` until a stage has succeeded).
    pub outputs: &'a [Option<Value>],
    pub job_dir: &'a str,
    pub job_id: &'a str,
}

impl Template {
    /// Parses `text`; `stage_index` maps a stage name to its position, or explains why it
    /// cannot be referenced from here.
    pub fn parse(text: &str, stage_index: &dyn Fn(&str) -> Result<usize, String>) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let end = text[i..].find('}').ok_or_else(|| {
                        format!("`{text}`: `{{` at byte {i} is never closed; write `{{{{` for a literal brace")
                    })?;
                    let inner = &text[i + 1..i + end];
                    while chars.peek().is_some_and(|(j, _)| *j <= i + end) {
                        chars.next();
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Reference(parse_reference(inner, stage_index)?));
                }
                '}' => return Err(format!("`{text}`: stray `}}` at byte {i}; write `}}}}` for a literal brace")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Template { segments })
    }

    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Reference(r) => Some(r),
            Segment::Literal(_) => None,
        })
    }

    /// The text, when the template has no references.
    pub fn as_literal(&self) -> Option<&str> {
        match self.segments.as_slice() {
            [Segment::Literal(s)] => Some(s),
            _ => None,
        }
    }

    pub fn render(&self, ctx: &RenderContext) -> Result<String, String> {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(s) => out.push_str(s),
                Segment::Reference(Reference::JobDir) => out.push_str(ctx.job_dir),
                Segment::Reference(Reference::JobId) => out.push_str(ctx.job_id),
                Segment::Reference(Reference::Input(path)) => {
                    let value = lookup(ctx.input, path)
                        .ok_or_else(|| format!("`{{input.{}}}`: the job input has no such value", path.join(".")))?;
                    push_value(&mut out, value);
                }
                Segment::Reference(Reference::Stage { index, name, path }) => {
                    let output = ctx.outputs.get(*index).and_then(|o| o.as_ref()).ok_or_else(|| {
                        format!(
                            "`{{stages.{name}}}`: stage `{name}` has no output (it must write JSON to $GPUFLOW_OUTPUT)"
                        )
                    })?;
                    let value = lookup(output, path).ok_or_else(|| {
                        format!("`{{stages.{name}.{}}}`: the output of `{name}` has no such value", path.join("."))
                    })?;
                    push_value(&mut out, value);
                }
            }
        }
        Ok(out)
    }
    /// What admission can check before any stage ran, with stage outputs counted as empty:
    /// the rendered length, and the first input read here whose string holds a NUL byte (no
    /// argv element can carry one), named as `a.b`.
    pub fn admission_check(&self, ctx: &RenderContext) -> (usize, Option<String>) {
        let mut len = 0;
        for segment in &self.segments {
            match segment {
                Segment::Literal(s) => len += s.len(),
                Segment::Reference(Reference::JobDir) => len += ctx.job_dir.len(),
                Segment::Reference(Reference::JobId) => len += ctx.job_id.len(),
                Segment::Reference(Reference::Input(path)) => match lookup(ctx.input, path) {
                    Some(Value::String(s)) if s.contains('\0') => return (len, Some(path.join("."))),
                    Some(Value::String(s)) => len += s.len(),
                    Some(other) => len += other.to_string().len(),
                    None => {}
                },
                Segment::Reference(Reference::Stage { .. }) => {}
            }
        }
        (len, None)
    }
}

fn parse_reference(inner: &str, stage_index: &dyn Fn(&str) -> Result<usize, String>) -> Result<Reference, String> {
    let parts: Vec<&str> = inner.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "`{{{inner}}}` is not a valid reference; use `{{input.KEY}}`, `{{stages.STAGE.KEY}}`, `{{job.dir}}` or `{{job.id}}`"
        ));
    }
    let owned = |rest: &[&str]| rest.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match parts.as_slice() {
        ["input", rest @ ..] if !rest.is_empty() => Ok(Reference::Input(owned(rest))),
        ["stages", name, rest @ ..] => {
            let index = stage_index(name)?;
            Ok(Reference::Stage { index, name: name.to_string(), path: owned(rest) })
        }
        ["job", "dir"] => Ok(Reference::JobDir),
        ["job", "id"] => Ok(Reference::JobId),
        _ => Err(format!(
            "`{{{inner}}}` is not a known reference; use `{{input.KEY}}`, `{{stages.STAGE.KEY}}`, `{{job.dir}}` or `{{job.id}}` (write `{{{{` for a literal brace){}",
            likely_reference(&parts).map(|r| format!("; did you mean `{{{r}}}`?")).unwrap_or_default()
        )),
    }
}

/// The reference a misspelt one most likely meant: `inputs.video` → `input.video`.
fn likely_reference(parts: &[&str]) -> Option<String> {
    let (head, rest) = parts.split_first()?;
    let head = super::shape::did_you_mean(head, ["input", "stages", "job"]).unwrap_or(head);
    match (head, rest) {
        ("job", [what]) => super::shape::did_you_mean(what, ["dir", "id"]).map(|w| format!("job.{w}")),
        ("input" | "stages", rest) if !rest.is_empty() && head != parts[0] => {
            Some(format!("{head}.{}", rest.join(".")))
        }
        _ => None,
    }
}

fn lookup<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut current = value;
    for key in path {
        current = match current {
            Value::Object(map) => map.get(key)?,
            Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!current.is_null()).then_some(current)
}

fn push_value(out: &mut String, value: &Value) {
    match value {
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stages(name: &str) -> Result<usize, String> {
        match name {
            "detect" => Ok(0),
            other => Err(format!("unknown stage `{other}`")),
        }
    }

    #[test]
    fn renders_input_outputs_and_job() {
        let t = Template::parse("{job.dir}/crop-{stages.detect.box.0}-{input.video}{{x}}", &stages).unwrap();
        let outputs = vec![Some(json!({"box": [4, 5]}))];
        let ctx = RenderContext { input: &json!({"video": "a b.mp4"}), outputs: &outputs, job_dir: "/d", job_id: "j" };
        assert_eq!(t.render(&ctx).unwrap(), "/d/crop-4-a b.mp4{x}");
    }

    #[test]
    fn errors_are_explicit() {
        assert!(Template::parse("{stages.nope.x}", &stages).unwrap_err().contains("unknown stage `nope`"));
        let e = Template::parse("{inputs.video}", &stages).unwrap_err();
        assert!(e.contains("not a known reference") && e.contains("did you mean `{input.video}`?"), "{e}");
        let e = Template::parse("{job.idd}", &stages).unwrap_err();
        assert!(e.contains("did you mean `{job.id}`?"), "{e}");
        assert!(!Template::parse("{zzz.q}", &stages).unwrap_err().contains("did you mean"));
        assert!(Template::parse("{input.video", &stages).unwrap_err().contains("never closed"));
        let t = Template::parse("{input.missing}", &stages).unwrap();
        let ctx = RenderContext { input: &json!({}), outputs: &[], job_dir: "", job_id: "" };
        assert!(t.render(&ctx).unwrap_err().contains("no such value"));
    }
}
