//! The draft: the stages in order — the header, `[model]`, the layers (one emit function per
//! kind of module), `[loss]`, `[data]`, `[eval]` — and the check that the text parses and builds.

use super::*;

/// Facts from a first pass over the modules that decide the `[model]` section.
struct ModelFacts<'m> {
    /// A batch norm layer with running statistics.
    has_bn: bool,
    /// Embeddings or attention: a language model (GELU activations).
    transformer: bool,
    /// The first linear, convolution or embedding.
    first_weighted: Option<&'m Module>,
    /// `[model] input_shape` when the data must be reshaped, with the TODO note that says so.
    input_shape: Option<Vec<usize>>,
    input_note: Option<String>,
}

/// The input of the current residual block: its name, and the flow there.
#[derive(Debug, Clone)]
struct BlockInput {
    name: String,
    flow: Flow,
}

/// Draft a spec from a checkpoint's tensors and, optionally, facts about the training set.
/// `out` is where the spec will live (relative data paths are written against its directory).
pub fn draft_from(src: &Source, data: Option<&DataFacts>, out: &Path) -> Result<Draft> {
    let (prefix, modules) = group(src);
    let mut o = Out {
        lines: Vec::new(),
        todos: Vec::new(),
    };
    let spec_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    write_header(&mut o, src, data, &modules);
    let facts = model_facts(&modules, data);
    write_model(&mut o, &prefix, &facts);
    let mut w = Writer::new(o, &modules, data, &facts);
    for i in 0..modules.len() {
        w.module(i);
    }
    let Writer {
        mut o,
        flow,
        layers,
        skipped,
        ..
    } = w;
    if layers.is_empty() {
        // A spec needs one layer at least: say why each module was left out.
        let why: Vec<String> = modules
            .iter()
            .filter_map(|m| match &m.kind {
                Kind::Other { what } => Some(format!("module '{}': {what}", m.path)),
                Kind::Layer { .. } => None,
            })
            .collect();
        return Err(LcaError::Checkpoint {
            path: src.checkpoint.clone(),
            msg: one_line(format!(
                "lca init found no layer it can write a spec for ({})",
                if why.is_empty() {
                    "the checkpoint holds no tensors".to_string()
                } else {
                    why.join("; ")
                }
            )),
        });
    }
    write_loss(&mut o, data, &flow);
    write_data(&mut o, data, &spec_dir, &facts);
    write_closing(&mut o);
    finish(o, src, data, out, layers, skipped)
}

/// The comment that opens the draft, and how the layer order was found.
fn write_header(o: &mut Out, src: &Source, data: Option<&DataFacts>, modules: &[Module]) {
    o.comment(
        "#",
        &format!(
            "Drafted by `lca init` (lca {}) from {}{}.",
            env!("CARGO_PKG_VERSION"),
            src.checkpoint.display(),
            data.map(|d| format!(" and {}", d.path.display()))
                .unwrap_or_default()
        ),
    );
    o.comment(
        "#",
        "A checkpoint stores parameters, not the forward pass: every line marked TODO(lca init) \
         is a guess with the most likely choice filled in. Review them (docs/init.md), then run \
         `lca inspect CKPTS/ --spec THIS_FILE`, which points at the first layer that does not fit.",
    );
    match &src.order {
        Some(_) if modules.iter().all(|m| m.rank.is_some()) => o.comment(
            "#",
            "Layer order: as the state_dict order recorded in the checkpoint's metadata.",
        ),
        _ => o.todo(
            "layer order guessed: safetensors stores tensors sorted by name, so the layers are in \
             the natural order of their module names (features.10 after features.9; embeddings \
             first, final norms and heads last, bnK after convK). Check it against your model's \
             forward().",
        ),
    }
    o.line("");
}

/// Facts that decide the `[model]` section, from a first pass over the modules.
fn model_facts<'m>(modules: &'m [Module], data: Option<&DataFacts>) -> ModelFacts<'m> {
    let has_bn = modules.iter().any(|m| {
        matches!(
            m.kind.layer(),
            Some(LayerKind::BatchNorm1d(b) | LayerKind::BatchNorm2d(b)) if b.track_running_stats
        )
    });
    let transformer = modules
        .iter()
        .any(|m| m.kind.is(Role::Embedding) || m.kind.is(Role::Attention));
    let first_weighted = modules
        .iter()
        .find(|m| m.kind.is(Role::Weighted) || m.kind.is(Role::Embedding));
    let mut input_shape: Option<Vec<usize>> = None;
    let mut input_note: Option<String> = None;
    // A convolution is recognised with its input channels per group as `in_channels`.
    if let (Some(d), Some(m)) = (data, first_weighted)
        && let Some(&LayerKind::Conv2d {
            in_channels: in_per_group,
            ..
        }) = m.kind.layer()
        && d.sample_shape.len() == 1
    {
        let f = d.sample_shape[0];
        if f.is_multiple_of(in_per_group) {
            let hw = f / in_per_group;
            let side = (hw as f64).sqrt().round() as usize;
            if side * side == hw {
                input_shape = Some(vec![in_per_group, side, side]);
                input_note = Some(format!(
                    "the data holds {f} values per sample and '{}' is a convolution with \
                     {in_per_group} input channel(s): reshaped to {in_per_group}×{side}×{side} \
                     (C, H, W). Check the height and width.",
                    m.path
                ));
            }
        }
    }
    ModelFacts {
        has_bn,
        transformer,
        first_weighted,
        input_shape,
        input_note,
    }
}

/// `[model]`.
fn write_model(o: &mut Out, prefix: &str, facts: &ModelFacts) {
    let ModelFacts {
        has_bn,
        input_shape,
        input_note,
        ..
    } = facts;

    o.line("[model]");
    o.line(kv("prefix", prefix));
    if let Some(s) = &input_shape {
        if let Some(n) = &input_note {
            o.todo(n);
        }
        o.line(kv("input_shape", s));
    }
    if *has_bn {
        o.todo(
            "batch norm: \"running-stats\" normalises with the checkpoints' running_mean and \
             running_var, as model.eval(); \"batch-stats\" uses the statistics of each \
             evaluation chunk, as training and the LCA study (set [eval] chunk_size to your \
             batch size then).",
        );
        o.line(kv("batch_norm", BnMode::RunningStats));
    }
    o.line("");
}

/// The layers being written, and what is known where the next one starts.
struct Writer<'m> {
    o: Out,
    modules: &'m [Module],
    plans: Vec<Plan>,
    /// The flow at the model input, and at the current layer.
    model_input: Flow,
    flow: Flow,
    /// Layers written as real tables, and modules left out.
    layers: Vec<(String, String)>,
    skipped: Vec<String>,
    /// Indices of the linear and convolution modules.
    weighted: Vec<usize>,
    last_weighted: Option<usize>,
    /// The activation the draft guesses (GELU in a language model, else ReLU).
    activation: LayerKind,
    names: BTreeSet<String>,
    /// Output shape of every named layer written so far (None: unknown without data).
    shapes: BTreeMap<String, Option<Vec<usize>>>,
    /// The current residual block's input, and its stride.
    block_in: Option<BlockInput>,
    stride: usize,
}

impl<'m> Writer<'m> {
    fn new(o: Out, modules: &'m [Module], data: Option<&DataFacts>, facts: &ModelFacts) -> Self {
        let ModelFacts {
            transformer,
            input_shape,
            ..
        } = facts;

        let model_input = Flow {
            shape: data.map(|d| {
                input_shape
                    .clone()
                    .unwrap_or_else(|| d.sample_shape.clone())
            }),
            ..Flow::default()
        };
        let flow = model_input.clone();
        let layers = Vec::new();
        let skipped = Vec::new();
        let weighted: Vec<usize> = modules
            .iter()
            .enumerate()
            .filter(|(_, m)| m.kind.is(Role::Weighted))
            .map(|(i, _)| i)
            .collect();
        let last_weighted = weighted.last().copied();
        let activation = if *transformer {
            LayerKind::Gelu {
                approximate: GeluApprox::None,
            }
        } else {
            LayerKind::Relu {}
        };
        let mut names: BTreeSet<String> = modules.iter().map(|m| m.path.clone()).collect();
        let plans = plan(modules, &mut names);
        // Output shape of every named layer written so far (None: unknown without data).
        let mut shapes: BTreeMap<String, Option<Vec<usize>>> = BTreeMap::new();
        shapes.insert("input".into(), model_input.shape.clone());
        Writer {
            o,
            modules,
            plans,
            flow,
            model_input,
            layers,
            skipped,
            weighted,
            last_weighted,
            activation,
            names,
            shapes,
            block_in: None,
            stride: 1,
        }
    }

    /// Write module `i`: the note or wiring of a block it starts, its table, the activation
    /// after it and the layers its block adds after it.
    fn module(&mut self, i: usize) {
        let modules = self.modules;
        let m = &modules[i];
        self.block_start(i);
        let head = self.head(i);
        match &m.kind {
            Kind::Layer { kind, drafter } => self.layer(i, head, kind.clone(), drafter),
            Kind::Other { what } => self.other(m, what),
        }
        self.shapes.insert(m.path.clone(), self.flow.shape.clone());
        self.activation_after(i);
        self.extras(i);
    }

    /// Before the first module of a block: the block's note, and its input.
    fn block_start(&mut self, i: usize) {
        let activation = self.activation.type_name();
        let Writer {
            o,
            modules,
            plans,
            flow,
            names,
            shapes,
            block_in,
            stride,
            ..
        } = self;
        let m = &modules[i];
        let p = &plans[i];

        match &p.starts {
            Some(start) => {
                let ty_hint = activation;
                let inp = o
                    .name_last(names, ty_hint)
                    .unwrap_or_else(|| "input".to_string());
                if !shapes.contains_key(&inp) {
                    shapes.insert(inp.clone(), flow.shape.clone());
                }
                *block_in = Some(BlockInput {
                    name: inp.clone(),
                    flow: flow.clone(),
                });
                match start {
                    Start::Res {
                        block,
                        main_out,
                        shortcut,
                    } => {
                        let cin = flow.image_channels();
                        *stride = if cin.is_some_and(|c| *main_out == 2 * c) {
                            2
                        } else {
                            1
                        };
                        o.todo(&format!(
                            "the layers named {block}.* look like a ResNet block ({} → \
                         {main_out} channels). A skip connection is not stored in a \
                         checkpoint: guessed `{block}.add` = the last layer of the main \
                         path + {}, then a {activation}, with '{inp}' as the block's input \
                         (docs/spec.md, \"Residual connections\"). {}",
                            cin.map_or("?".to_string(), |c| c.to_string()),
                            if *shortcut {
                                "the shortcut's"
                            } else {
                                "the block's input (identity shortcut)"
                            },
                            if *stride == 2 {
                                "The channels double: stride 2 guessed on the first convolution \
                             with a kernel larger than 1 and on the shortcut's convolution."
                            } else {
                                "Stride 1 guessed (the channels do not double)."
                            }
                        ));
                    }
                    Start::PreNorm { block } => o.todo(&format!(
                        "the layers named {block}.* look like a pre-norm transformer block: \
                     guessed x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), with '{inp}' as \
                     the block's input and an `add` layer for each residual join \
                     (docs/spec.md, \"Language models\"). A post-norm block \
                     (nn.TransformerEncoderLayer's default) puts each norm after its add."
                    )),
                }
                o.line("");
            }
            None => {
                if let Some(b) = block_name(m)
                    && (i == 0 || block_name(&modules[i - 1]).as_ref() != Some(&b))
                    && modules[i..]
                        .iter()
                        .take_while(|n| block_name(n).as_ref() == Some(&b))
                        .count()
                        > 1
                    && !p.planned
                {
                    o.todo(&format!(
                    "the layers named {b}.* form one block (a ResNet or transformer block?). \
                     A skip connection is not stored in a checkpoint: if the block has one, \
                     write it as a layer `type = \"add\"` with `input = [\"<layer before the block>\", \"<last layer of the block>\"]` (docs/spec.md, \"Residual connections\"), and check where its activations go."
                ));
                    o.line("");
                }
            }
        }
    }

    /// `name` and `input` of module `i`'s table; sets the flow to what it reads.
    fn head(&mut self, i: usize) -> Vec<String> {
        let Writer {
            modules,
            plans,
            model_input,
            flow,
            block_in,
            ..
        } = self;
        let m = &modules[i];
        let p = &plans[i];

        let mut head = vec![kv("name", &m.path)];
        if p.from_model_input {
            head.push(kv("input", "input"));
            *flow = model_input.clone();
        } else if p.from_block_input
            && let Some(b) = block_in
        {
            head.push(kv("input", &b.name));
            *flow = b.flow.clone();
        }
        head
    }

    /// A layer of the registry, drafted by its layer type's drafter where it stands: the
    /// notes and parameter-free layers it needs before it, its table, the flow after it.
    fn layer(&mut self, i: usize, head: Vec<String>, kind: LayerKind, drafter: &Drafter) {
        let at = DraftIn {
            path: &self.modules[i].path,
            flow: self.flow.clone(),
            stride: if self.plans[i].strided {
                self.stride
            } else {
                1
            },
        };
        let d = (drafter.draft)(kind, at);
        let Writer {
            o, modules, layers, ..
        } = self;
        for piece in &d.lead {
            match piece {
                Lead::Todo(text) => o.todo(text),
                Lead::Table(kind) => write_table(o, &settings(kind, &[])),
            }
        }
        let mut t = head;
        t.extend(settings(&d.kind, d.explicit));
        emit(o, &modules[i], &t, layers, d.what);
        self.flow = d.flow;
    }

    fn other(&mut self, m: &Module, what: &str) {
        let Writer { o, skipped, .. } = self;
        o.todo(&format!(
            "module '{}' ({what}) is not a layer lca init recognises; left out. Its \
             tensors:",
            m.path
        ));
        for t in &m.tensors {
            o.line(format!("#     {}  {} {:?}", t.full, t.dtype, t.shape));
        }
        o.line("");
        skipped.push(if m.path.is_empty() {
            // No module name: the tensors say what was left out.
            m.tensors
                .iter()
                .map(|t| t.full.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            m.path.clone()
        });
    }

    /// An activation after a linear or conv layer (after its norm, if one follows), except
    /// after the last one; inside a recognised block, where the block puts them.
    fn activation_after(&mut self, i: usize) {
        let last_weighted = self.last_weighted;
        let activation = settings(&self.activation, &[]);
        let Writer {
            o,
            modules,
            plans,
            weighted,
            ..
        } = self;
        let m = &modules[i];
        let p = &plans[i];
        let next_is_norm = modules
            .get(i + 1)
            .is_some_and(|n| n.kind.is_batch_norm() && m.kind.is(Role::Weighted));
        let ends_hidden = if m.kind.is(Role::Weighted) {
            Some(i)
        } else if m.kind.is_batch_norm() && i > 0 {
            Some(i - 1)
        } else {
            None
        };
        if let Some(j) = ends_hidden
            && !p.planned
            && !next_is_norm
            && Some(j) != last_weighted
            && weighted.contains(&j)
            && last_weighted.is_some_and(|l| l > i)
        {
            o.todo(&format!(
                "activation not stored in a checkpoint: {} guessed after '{}' (or \
             tanh, sigmoid, gelu, leaky_relu; none if the model has none).",
                self.activation.type_name(),
                m.path
            ));
            write_table(o, &activation);
        }
    }

    /// The layers the plan writes after module `i`: activations and residual joins.
    fn extras(&mut self, i: usize) {
        let activation = settings(&self.activation, &[]);
        let Writer {
            o,
            plans,
            flow,
            shapes,
            block_in,
            ..
        } = self;
        let p = &plans[i];
        for extra in &p.after {
            match extra {
                Extra::Act(name) => {
                    let mut t = Vec::new();
                    if let Some(n) = name {
                        t.push(kv("name", n));
                        shapes.insert(n.clone(), flow.shape.clone());
                    }
                    t.extend(activation.iter().cloned());
                    write_table(o, &t);
                }
                Extra::Add { name, inputs } => {
                    let inputs: Vec<String> = inputs
                        .iter()
                        .map(|r| match r {
                            Ref::BlockInput => block_in
                                .as_ref()
                                .map_or("input".to_string(), |b| b.name.clone()),
                            Ref::Layer(n) => n.clone(),
                        })
                        .collect();
                    let known: Vec<&Vec<usize>> = inputs
                        .iter()
                        .filter_map(|n| shapes.get(n).and_then(|s| s.as_ref()))
                        .collect();
                    let mut t = vec![kv("name", name)];
                    t.extend(settings(&LayerKind::Add {}, &[]));
                    t.push(kv("input", &inputs));
                    if known.windows(2).any(|w| w[0] != w[1]) {
                        o.todo(&format!(
                            "the residual join '{name}' adds {}: the shapes differ (a stride, a \
                         shortcut, or the channels were guessed wrong), so it is left \
                         commented out.",
                            known
                                .iter()
                                .map(|s| dims(s))
                                .collect::<Vec<_>>()
                                .join(" and ")
                        ));
                        o.line("# [[layers]]");
                        for k in &t {
                            o.line(format!("# {k}"));
                        }
                        o.line("");
                    } else {
                        write_table(o, &t);
                        if let Some(s) = known.first() {
                            flow.shape = Some(s.to_vec());
                        }
                        shapes.insert(name.clone(), flow.shape.clone());
                    }
                }
            }
        }
    }
}

/// `[loss]`.
fn write_loss(o: &mut Out, data: Option<&DataFacts>, flow: &Flow) {
    o.line("[loss]");
    let loss_ce = match data {
        Some(d) => d.classes.is_some(),
        None => true,
    };
    match data {
        Some(d) if loss_ce => {
            let classes = d.classes.unwrap_or(0);
            let logits = flow.shape.as_ref().and_then(|s| s.last().copied());
            let mut note = if d.tokens.is_some() {
                format!(
                    "next-token targets are ids 0..{}: cross-entropy guessed (the mean over \
                     every position of every sequence).",
                    classes.saturating_sub(1)
                )
            } else {
                format!(
                    "y holds integer labels 0..{}: classification with cross-entropy guessed.",
                    classes.saturating_sub(1)
                )
            };
            match logits {
                Some(k) if k == classes => note.push_str(&format!(
                    " The last layer gives {k} logits for {classes} classes."
                )),
                Some(k) if k > classes => note.push_str(&format!(
                    " The last layer gives {k} logits; labels above {} do not occur in the data.",
                    classes - 1
                )),
                Some(k) => note.push_str(&format!(
                    " But the last layer gives only {k} logits for labels up to {}: the data or \
                     the last layer is not the one trained.",
                    classes - 1
                )),
                None => {}
            }
            o.todo(&note);
        }
        Some(d) => {
            o.todo(&format!(
                "y holds non-integer values (shape {:?} per sample): regression with mean \
                 squared error guessed.",
                d.y_shape
            ));
        }
        None => o.todo(
            "loss guessed (no --data): cross_entropy for class labels, mse for float targets.",
        ),
    }
    for l in lines_of(&if loss_ce {
        LossSpec::CrossEntropy {}
    } else {
        LossSpec::Mse {}
    }) {
        o.line(l);
    }
    o.line("");
}

/// `[data]`.
fn write_data(o: &mut Out, data: Option<&DataFacts>, spec_dir: &Path, facts: &ModelFacts) {
    let first_weighted = facts.first_weighted;
    o.line("[data]");
    match data {
        Some(d) => {
            o.line(kv("train", spec_path(&d.path, spec_dir).to_string_lossy()));
            if let Some(t) = &d.tokens {
                o.todo(&format!(
                    "'{t}' holds token ids [N, T+1] = [{}, {}]: each row gives the inputs (its \
                     first {} ids) and the next-token targets (its last {}).",
                    d.samples,
                    d.sample_shape.first().map_or(0, |t| t + 1),
                    d.sample_shape.first().copied().unwrap_or(0),
                    d.sample_shape.first().copied().unwrap_or(0),
                ));
                o.line(kv("tokens", t));
            } else {
                if d.names_guessed {
                    o.todo(&format!(
                        "the data file has no tensors named x and y: '{}' taken as the inputs \
                         and '{}' as the targets.",
                        d.x, d.y
                    ));
                }
                o.line(kv("x", &d.x));
                o.line(kv("y", &d.y));
            }
            let token_ids = first_weighted.is_some_and(|m| m.kind.is(Role::Embedding));
            if d.tokens.is_some() {
                // Token ids: no preprocessing (a [data] tokens tensor has none).
            } else if token_ids {
                o.todo("x holds token ids for an embedding: no preprocessing.");
            } else if d.x_integral && d.x_max > 1.0 {
                let (scale, why) = if d.x_max > 128.0 && d.x_max <= 255.0 {
                    (
                        1.0 / 255.0,
                        "scale = 1/255 guessed (8-bit images, as ToTensor())".to_string(),
                    )
                } else {
                    (
                        1.0 / d.x_max,
                        format!("scale = 1/{} guessed (maps the inputs to [0, 1])", d.x_max),
                    )
                };
                o.todo(&format!(
                    "x holds integers {}..{}{}; {why}. Use your training transform; a \
                     Normalize(mean, std) after it is written as `mean = [...]` and `std = [...]` \
                     (one value, or one per channel).",
                    d.x_min,
                    d.x_max,
                    d.x_dtype
                        .as_deref()
                        .map(|t| format!(" ({t})"))
                        .unwrap_or_default(),
                ));
                o.line(kv("scale", scale));
            } else {
                o.todo(&format!(
                    "x holds values {}..{}, used as they are. If your training transform \
                     rescales or normalises them, add `scale = ...`, `mean = [...]`, \
                     `std = [...]` (one value, or one per channel).",
                    d.x_min, d.x_max
                ));
            }
            let val = d
                .validation
                .as_ref()
                .map(|v| spec_path(v, spec_dir).to_string_lossy().to_string());
            o.todo(&format!(
                "a held-out set to allocate along the same path? Uncomment{}:",
                if val.is_some() {
                    " (this file was found next to the training set)"
                } else {
                    " and set the path"
                }
            ));
            o.line(format!(
                "# {}",
                kv("validation", val.as_deref().unwrap_or("val.safetensors"))
            ));
        }
        None => {
            o.todo(
                "the training set (no --data given): a .safetensors or .npz file with inputs x \
                 [N, ...] and targets y; set its path (relative to this file) and preprocessing.",
            );
            o.line(kv("train", "train.safetensors"));
            o.line(kv("x", "x"));
            o.line(kv("y", "y"));
        }
    }
}

/// `[eval]` and the commented-out `[regularization]`.
fn write_closing(o: &mut Out) {
    o.line("");
    o.line("[eval]");
    o.line(kv("chunk_size", EvalSection::default().chunk_size));
    o.line("");
    o.todo(
        "an explicit L2 term λ‖θ‖² in the training objective? Uncomment and set λ (its LCA is \
         reported in its own column; SGD's weight_decay = wd is λ = wd / 2):",
    );
    o.line("# [regularization]");
    o.line("# l2 = 1e-4");
}

/// The text, checked: it must parse, and with data, whether it builds a model that fits.
fn finish(
    o: Out,
    src: &Source,
    data: Option<&DataFacts>,
    out: &Path,
    layers: Vec<(String, String)>,
    skipped: Vec<String>,
) -> Result<Draft> {
    let mut text = o.lines.join("\n");
    text.push('\n');
    // The draft must parse, whatever was left out.
    let spec = Spec::parse(&text, out).map_err(|e| {
        LcaError::Usage(format!(
            "internal error: lca init drafted a spec that does not parse ({e}); please report \
             this with the checkpoint's tensor list"
        ))
    })?;
    let builds = data.map(|d| {
        let shape = spec
            .model
            .input_shape
            .clone()
            .unwrap_or_else(|| d.sample_shape.clone());
        match Model::<f32>::build(&spec, &shape) {
            Ok(m) => {
                let want = d.classes.map(|k| (k, m.output_shape().last().copied()));
                match want {
                    Some((k, Some(have))) if have < k => Err(format!(
                        "the model gives {have} logits but labels go up to {}",
                        k - 1
                    )),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e.to_string()),
        }
    });
    Ok(Draft {
        checkpoint: src.checkpoint.clone(),
        text,
        todos: o.todos,
        layers,
        skipped,
        builds,
    })
}
