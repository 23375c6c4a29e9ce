//! Emitting: the TOML text with its TODO notes, and the writers of layer tables.

use super::*;
// ---------------------------------------------------------------------------------------
// Writing the draft

/// The text being written, with its TODO notes.
pub(super) struct Out {
    pub(super) lines: Vec<String>,
    pub(super) todos: Vec<(usize, String)>,
}

impl Out {
    pub(super) fn line(&mut self, s: impl Into<String>) {
        self.lines.push(one_line(s.into()));
    }

    /// The name of the last layer table written, giving it one (`base`, made unique) when it
    /// has none; `None` when no layer has been written.
    pub(super) fn name_last(&mut self, names: &mut BTreeSet<String>, base: &str) -> Option<String> {
        let start = self.lines.iter().rposition(|l| l == "[[layers]]")?;
        let end = self.lines[start + 1..]
            .iter()
            .position(|l| l.is_empty())
            .map_or(self.lines.len(), |k| start + 1 + k);
        let value = |l: &str, key: &str| -> Option<String> {
            let v = l.strip_prefix(key)?.strip_prefix(" = ")?;
            toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()?
                .get("v")?
                .as_str()
                .map(|s| s.to_string())
        };
        let table = &self.lines[start + 1..end];
        if let Some(n) = table.iter().find_map(|l| value(l, "name")) {
            return Some(n);
        }
        let ty = table.iter().find_map(|l| value(l, "type"));
        let name = unique(names, ty.as_deref().unwrap_or(base));
        self.lines.insert(start + 1, kv("name", &name));
        for t in &mut self.todos {
            if t.0 > start + 1 {
                t.0 += 1;
            }
        }
        Some(name)
    }

    /// A `# TODO(lca init): …` note, wrapped at about 96 columns.
    pub(super) fn todo(&mut self, text: &str) {
        self.todos
            .push((self.lines.len() + 1, one_line(text.to_string())));
        self.comment(TODO, text);
    }

    /// A plain comment, wrapped, with `lead` on its first line.
    pub(super) fn comment(&mut self, lead: &str, text: &str) {
        let mut cur = lead.to_string();
        // Words, with `code spans` kept on one line.
        let mut words: Vec<String> = Vec::new();
        let mut open = false;
        for w in text.split(' ') {
            match words.last_mut() {
                Some(last) if open => {
                    last.push(' ');
                    last.push_str(w);
                }
                _ => words.push(w.to_string()),
            }
            if w.matches('`').count() % 2 == 1 {
                open = !open;
            }
        }
        for word in &words {
            if cur.chars().count() + 1 + word.chars().count() > 96 && cur.len() > lead.len() {
                self.lines.push(one_line(cur));
                cur = "#  ".to_string();
            }
            cur.push(' ');
            cur.push_str(word);
        }
        self.lines.push(one_line(cur));
    }
}

/// A line of the draft kept on one line: control characters (a newline in a tensor name
/// quoted in a comment) are written escaped, so that a name can never end a comment and start
/// a line of TOML. (Names in TOML values are serialised by [`kv`], which escapes them.)
pub(super) fn one_line(s: String) -> String {
    if !s.chars().any(char::is_control) {
        return s;
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One `key = value` line of TOML, the value serialised on one line: strings as basic
/// strings with every control character escaped (a multi-line string would not survive the
/// draft's one-line rule), lists and inline tables of those.
pub(super) fn kv(key: &str, value: impl serde::Serialize) -> String {
    let value = toml::Value::try_from(value).expect("a draft's values serialise to TOML");
    format!("{} = {}", toml_key(key), inline(&value))
}

/// A TOML value on one line.
fn inline(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => basic_string(s),
        toml::Value::Array(a) => {
            format!("[{}]", a.iter().map(inline).collect::<Vec<_>>().join(", "))
        }
        toml::Value::Table(t) if t.is_empty() => "{}".to_string(),
        toml::Value::Table(t) => format!(
            "{{ {} }}",
            t.iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), inline(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// A key: bare when TOML allows it, else a basic string.
fn toml_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare { k.to_string() } else { basic_string(k) }
}

/// A TOML basic string (`"..."`) with quotes, backslashes and control characters escaped.
fn basic_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The lines of a spec type serialised as a TOML table, in the order of its fields.
pub(super) fn lines_of(value: &impl serde::Serialize) -> Vec<String> {
    toml::to_string(value)
        .expect("spec types serialise to TOML")
        .lines()
        .map(|l| l.to_string())
        .collect()
}

/// A layer's settings as the spec writes them, by serialising the spec type: `type` first,
/// then, in the order of the type's fields, every setting that differs from its default or is
/// named in `explicit` (settings the draft guessed and wants seen).
pub(super) fn settings(kind: &LayerKind, explicit: &[&str]) -> Vec<String> {
    let lines = lines_of(kind);
    let table: toml::Table = toml::from_str(&lines.join("\n")).expect("serialised settings parse");
    // A setting is at its default when leaving it out reads back the same layer.
    let is_default = |key: &str| {
        let mut t = table.clone();
        t.remove(key);
        toml::Value::Table(t).try_into::<LayerKind>().ok().as_ref() == Some(kind)
    };
    lines
        .into_iter()
        .filter(|l| {
            let key = l.split(" = ").next().unwrap_or("");
            key == "type" || explicit.contains(&key) || !is_default(key)
        })
        .collect()
}

/// Write a parameter-free layer table.
pub(super) fn write_table(o: &mut Out, keys: &[String]) {
    o.line("[[layers]]");
    for k in keys {
        o.line(k.clone());
    }
    o.line("");
}

/// Write a layer with parameters, with its `tied` key and the note about it when it shares a
/// tensor with an earlier layer.
pub(super) fn emit(
    o: &mut Out,
    m: &Module,
    table: &[String],
    layers: &mut Vec<(String, String)>,
    what: String,
) {
    let mut table = table.to_vec();
    // name, type, then input, as the spec's examples.
    if let Some(k) = table.iter().position(|l| l.starts_with("input ="))
        && let Some(t) = table.iter().position(|l| l.starts_with("type ="))
        && k < t
    {
        let line = table.remove(k);
        table.insert(t, line);
    }
    if !m.tied.is_empty() {
        o.todo(&format!(
            "'{}' shares {} with an earlier layer (tied weights: the checkpoint stores the \
             tensor once, or twice with the same values): one parameter, reported under the \
             earlier layer. Delete the `tied` line if the two are separate parameters.",
            m.path,
            m.tied
                .iter()
                .map(|(k, v)| format!("its {k} ({v})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut tied = toml::Table::new();
        for (k, v) in &m.tied {
            tied.insert(k.clone(), toml::Value::String(v.clone()));
        }
        table.push(kv("tied", tied));
    }
    write_table(o, &table);
    layers.push((m.path.clone(), what));
}
