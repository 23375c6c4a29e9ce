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
        self.lines
            .insert(start + 1, format!("name = {}", quote(&name)));
        for t in &mut self.todos {
            if t.0 > start + 1 {
                t.0 += 1;
            }
        }
        Some(name)
    }

    /// A `# TODO(lca init): …` note, wrapped at about 96 columns.
    pub(super) fn todo(&mut self, text: &str) {
        self.todos.push((self.lines.len() + 1, text.to_string()));
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
                self.lines.push(cur);
                cur = "#  ".to_string();
            }
            cur.push(' ');
            cur.push_str(word);
        }
        self.lines.push(cur);
    }
}

/// A line of the draft kept on one line: control characters (a newline in a tensor name
/// quoted in a comment) are written escaped, so that a name can never end a comment and start
/// a line of TOML. (Names in TOML values are quoted by [`quote`], which escapes them.)
fn one_line(s: String) -> String {
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

/// TOML string literal.
pub(super) fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

pub(super) fn pair(p: [usize; 2]) -> String {
    if p[0] == p[1] {
        p[0].to_string()
    } else {
        format!("[{}, {}]", p[0], p[1])
    }
}

pub(super) fn dims(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

/// A layer's settings as the spec writes them, by serialising the spec type: `type` first,
/// then, in the order of the type's fields, every setting that differs from its default or is
/// named in `explicit` (settings the draft guessed and wants seen).
pub(super) fn settings(kind: &LayerKind, explicit: &[&str]) -> Vec<String> {
    let text = toml::to_string(kind).expect("layer settings serialise to TOML");
    let table: toml::Table = toml::from_str(&text).expect("serialised settings parse");
    // A setting is at its default when leaving it out reads back the same layer.
    let is_default = |key: &str| {
        let mut t = table.clone();
        t.remove(key);
        toml::Value::Table(t).try_into::<LayerKind>().ok().as_ref() == Some(kind)
    };
    text.lines()
        .filter(|l| {
            let key = l.split(" = ").next().unwrap_or("");
            key == "type" || explicit.contains(&key) || !is_default(key)
        })
        .map(|l| l.to_string())
        .collect()
}

/// Whether this build's spec parser accepts a layer table (so that new layer types are used
/// as soon as they exist, and never before).
pub(super) fn supported(table: &[String]) -> bool {
    // `name`, `input` and `tied` are read by the spec parser, not by the layer type.
    let keys: Vec<&str> = table
        .iter()
        .map(|l| l.as_str())
        .filter(|l| {
            !l.starts_with("name =") && !l.starts_with("input =") && !l.starts_with("tied =")
        })
        .collect();
    toml::from_str::<toml::Table>(&keys.join("\n"))
        .ok()
        .and_then(|t| toml::Value::Table(t).try_into::<LayerKind>().ok())
        .is_some()
}

/// The per-sample shape flowing between layers, as far as it is known.
#[derive(Debug, Clone)]
pub(super) struct Flow {
    pub(super) shape: Option<Vec<usize>>,
    /// Kind of the last layer with parameters written.
    pub(super) after_conv: bool,
}

/// Write a parameter-free layer table.
pub(super) fn write_table(o: &mut Out, keys: &[String]) {
    o.line("[[layers]]");
    for k in keys {
        o.line(k.clone());
    }
    o.line("");
}

/// Write a layer with parameters: as a real table when this build supports it, else as a
/// commented-out block with a TODO.
pub(super) fn emit(
    o: &mut Out,
    m: &Module,
    table: &[String],
    layers: &mut Vec<(String, String)>,
    skipped: &mut Vec<String>,
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
        let list = m
            .tied
            .iter()
            .map(|(k, v)| format!("{k} = {}", quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
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
        table.push(format!("tied = {{ {list} }}"));
    }
    let table = &table[..];
    if supported(table) {
        write_table(o, table);
        layers.push((m.path.clone(), what));
    } else {
        let ty = table
            .iter()
            .find_map(|l| l.strip_prefix("type = "))
            .unwrap_or("?");
        o.todo(&format!(
            "'{}' is a {what} layer, but this build of lca has no layer type {ty}: the block \
             below is left commented out and its tensors ({}) are not analysed.",
            m.path,
            m.tensors
                .iter()
                .map(|t| t.full.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        o.line("# [[layers]]");
        for k in table {
            o.line(format!("# {k}"));
        }
        o.line("");
        skipped.push(m.path.clone());
    }
}

/// The convolutions give `[C, H, W]` but the linear layer `name` takes `inp` features: write
/// the pooling that makes the sizes fit (global average pooling when `inp = C`, an adaptive
/// average pool to the size `inp / C` implies otherwise), marked TODO.
pub(super) fn pool_to_fit(o: &mut Out, flow: &mut Flow, name: &str, inp: usize) {
    let Some(s) = flow.shape.clone() else { return };
    let (c, h, w) = (s[0], s[1], s[2]);
    let flatten = ["type = \"flatten\"".to_string()];
    if inp == c {
        let gap = ["type = \"global_avg_pool\"".to_string()];
        o.todo(&format!(
            "the convolutions give {c}×{h}×{w} and '{name}' takes {inp} = {c} channels: a \
             global average pool (ResNet-style, nn.AdaptiveAvgPool2d(1) + flatten) guessed."
        ));
        if supported(&gap) {
            write_table(o, &gap);
        } else {
            let ada = [
                "type = \"adaptive_avg_pool2d\"".to_string(),
                "output_size = 1".into(),
            ];
            if supported(&ada) {
                write_table(o, &ada);
                write_table(o, &flatten);
            } else {
                o.line("# [[layers]]");
                o.line("# type = \"global_avg_pool\"");
                o.line("");
                write_table(o, &flatten);
            }
        }
        flow.shape = Some(vec![c]);
        return;
    }
    let side = if inp.is_multiple_of(c) {
        let a = inp / c;
        let r = (a as f64).sqrt().round() as usize;
        (r * r == a && r <= h.min(w)).then_some(r)
    } else {
        None
    };
    match side {
        Some(r) => {
            let ada = [
                "type = \"adaptive_avg_pool2d\"".to_string(),
                format!("output_size = {r}"),
            ];
            let ok = supported(&ada);
            o.todo(&format!(
                "the convolutions (with the guessed strides and padding) give {c}×{h}×{w} = {} \
                 values, but '{name}' takes {inp} = {c}×{r}×{r}: the maps must shrink from \
                 {h}×{w} to {r}×{r}. {} Replace it by your model's pooling (max_pool2d, \
                 avg_pool2d) and strides.",
                c * h * w,
                if ok {
                    "An adaptive average pool to that size is written so that the file runs."
                } else {
                    "Pooling is needed here."
                }
            ));
            if ok {
                write_table(o, &ada);
            }
            write_table(o, &flatten);
            flow.shape = Some(vec![if ok { inp } else { c * h * w }]);
        }
        None => {
            o.todo(&format!(
                "the convolutions give {c}×{h}×{w} = {} values but '{name}' takes {inp}: add \
                 the pooling and strides of your model.",
                c * h * w
            ));
            write_table(o, &flatten);
            flow.shape = Some(vec![c * h * w]);
        }
    }
}
