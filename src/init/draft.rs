//! The draft: the stages in order (header, `[model]`, layers, `[loss]`, `[data]`).

use super::*;
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

    // Facts that decide the [model] section come from a first pass.
    let has_bn = modules
        .iter()
        .any(|m| matches!(m.kind, Kind::BatchNorm { running: true, .. }));
    let transformer = modules
        .iter()
        .any(|m| matches!(m.kind, Kind::Embedding { .. } | Kind::Attention { .. }));
    let first_weighted = modules.iter().find(|m| {
        matches!(
            m.kind,
            Kind::Linear { .. } | Kind::Conv2d { .. } | Kind::Embedding { .. }
        )
    });
    let mut input_shape: Option<Vec<usize>> = None;
    let mut input_note: Option<String> = None;
    if let (Some(d), Some(m)) = (data, first_weighted)
        && let Kind::Conv2d {
            in_per_group,
            kernel: _,
            ..
        } = m.kind
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
    o.line("[model]");
    o.line(format!("prefix = {}", quote(&prefix)));
    if let Some(s) = &input_shape {
        if let Some(n) = &input_note {
            o.todo(n);
        }
        o.line(format!(
            "input_shape = [{}]",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if has_bn {
        o.todo(
            "batch norm: \"running-stats\" normalises with the checkpoints' running_mean and \
             running_var, as model.eval(); \"batch-stats\" uses the statistics of each \
             evaluation chunk, as training and the LCA study (set [eval] chunk_size to your \
             batch size then).",
        );
        o.line("batch_norm = \"running-stats\"");
    }
    o.line("");

    // Layers.
    let model_input = Flow {
        shape: data.map(|d| {
            input_shape
                .clone()
                .unwrap_or_else(|| d.sample_shape.clone())
        }),
        after_conv: false,
    };
    let mut flow = model_input.clone();
    let mut layers = Vec::new();
    let mut skipped = Vec::new();
    let weighted: Vec<usize> = modules
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.kind, Kind::Linear { .. } | Kind::Conv2d { .. }))
        .map(|(i, _)| i)
        .collect();
    let last_weighted = weighted.last().copied();
    let activation = if transformer { "gelu" } else { "relu" };
    let mut channels: Option<usize> = None;
    let add_supported = supported(&["type = \"add\"".into()]);
    let mut names: BTreeSet<String> = modules.iter().map(|m| m.path.clone()).collect();
    let plans = plan(&modules, add_supported, &mut names);
    // Output shape of every named layer written so far (None: unknown without data).
    let mut shapes: BTreeMap<String, Option<Vec<usize>>> = BTreeMap::new();
    shapes.insert("input".into(), model_input.shape.clone());
    // The current residual block: its input's name, flow and channels, and its stride.
    let mut block_in: Option<(String, Flow, Option<usize>)> = None;
    let mut stride = 1;
    for (i, m) in modules.iter().enumerate() {
        let p = &plans[i];
        match &p.starts {
            Some(start) => {
                let ty_hint = activation;
                let inp = o
                    .name_last(&mut names, ty_hint)
                    .unwrap_or_else(|| "input".to_string());
                if !shapes.contains_key(&inp) {
                    shapes.insert(inp.clone(), flow.shape.clone());
                }
                block_in = Some((inp.clone(), flow.clone(), channels));
                match start {
                    Start::Res {
                        block,
                        main_out,
                        shortcut,
                    } => {
                        let cin = match &flow.shape {
                            Some(s) if s.len() == 3 => Some(s[0]),
                            _ => channels,
                        };
                        stride = if cin.is_some_and(|c| *main_out == 2 * c) {
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
                            if stride == 2 {
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
                         write it {}(docs/spec.md, \"Residual connections\"), and check where its activations go.",
                        if add_supported {
                            "as a layer `type = \"add\"` with `input = [\"<layer before the block>\", \"<last layer of the block>\"]` "
                        } else {
                            ""
                        }
                    ));
                    o.line("");
                }
            }
        }
        let mut head = vec![format!("name = {}", quote(&m.path))];
        if p.from_model_input {
            head.push("input = \"input\"".into());
            flow = model_input.clone();
        } else if p.from_block_input
            && let Some((name, f, c)) = &block_in
        {
            head.push(format!("input = {}", quote(name)));
            flow = f.clone();
            channels = *c;
        }
        let head = head;
        match &m.kind {
            Kind::Linear { inp, out, bias } => {
                let inp = *inp;
                match flow.shape.clone() {
                    Some(s) if flow.after_conv && s.len() == 3 => {
                        if s.iter().product::<usize>() == inp {
                            write_table(&mut o, &["type = \"flatten\"".into()]);
                            flow.shape = Some(vec![inp]);
                        } else {
                            pool_to_fit(&mut o, &mut flow, &m.path, inp);
                        }
                    }
                    Some(s)
                        if s.len() >= 2
                            && s.last() != Some(&inp)
                            && s.iter().product::<usize>() == inp =>
                    {
                        o.todo(&format!(
                            "'{}' takes {inp} features and each sample is {} = {inp} values: \
                             flattened first (nn.Flatten).",
                            m.path,
                            dims(&s)
                        ));
                        write_table(&mut o, &["type = \"flatten\"".into()]);
                        flow.shape = Some(vec![inp]);
                    }
                    None if flow.after_conv => {
                        o.todo(&format!(
                            "a linear layer after convolutions: the feature maps are flattened \
                             first; '{}' expects {inp} = channels × height × width (add the \
                             pooling of your model before it).",
                            m.path
                        ));
                        write_table(&mut o, &["type = \"flatten\"".into()]);
                    }
                    _ => {}
                }
                if let Some(s) = &flow.shape {
                    let last = s.last().copied().unwrap_or(1);
                    if last != inp {
                        o.todo(&format!(
                            "'{}' expects {inp} input features but receives {} ({}): fix the \
                             layers before it (or the data).",
                            m.path,
                            last,
                            dims(s)
                        ));
                    }
                }
                let mut t = head.clone();
                t.extend([
                    "type = \"linear\"".into(),
                    format!("in_features = {inp}"),
                    format!("out_features = {out}"),
                ]);
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("linear {inp}→{out}"),
                );
                flow.shape = Some(match flow.shape.take() {
                    Some(mut s) if !s.is_empty() => {
                        *s.last_mut().expect("non-empty") = *out;
                        s
                    }
                    _ => vec![*out],
                });
                flow.after_conv = false;
                channels = Some(*out);
            }
            Kind::Conv2d {
                in_per_group,
                out,
                kernel,
                bias,
            } => {
                let have = match &flow.shape {
                    Some(s) if s.len() == 3 => Some(s[0]),
                    Some(_) => None,
                    None => channels,
                };
                let mut groups = 1;
                if let Some(c) = have
                    && c != *in_per_group
                    && c.is_multiple_of(*in_per_group)
                    && out.is_multiple_of(c / in_per_group)
                {
                    groups = c / in_per_group;
                }
                let in_channels = in_per_group * groups;
                let padding = [kernel[0] / 2, kernel[1] / 2];
                let s = if p.strided { stride } else { 1 };
                let mut note = format!(
                    "'{}': stride, padding and dilation are not stored in a checkpoint; guessed \
                     stride {s}, padding {}{}. Pooling after it is not stored either: add your \
                     model's max_pool2d / avg_pool2d layers.",
                    m.path,
                    pair(padding),
                    if s == 1 {
                        " (keeps the size for odd kernels)"
                    } else {
                        " (the block's down-sampling)"
                    }
                );
                if groups > 1 {
                    note.push_str(&format!(
                        " groups = {groups}: the weight has {in_per_group} input channels per \
                         group and the layer before gives {in_channels}."
                    ));
                } else if have.is_none_or(|c| c == *in_per_group) {
                    note.push_str(" groups = 1 assumed (in_channels = weight.shape[1]).");
                }
                if let Some(sh) = &flow.shape
                    && (sh.len() != 3 || sh[0] != in_channels)
                {
                    note.push_str(&format!(
                        " It receives {} but expects {in_channels} channels × height × width: \
                         check [model] input_shape and the layers before it.",
                        dims(sh)
                    ));
                }
                o.todo(&note);
                let mut t = head.clone();
                t.extend([
                    "type = \"conv2d\"".into(),
                    format!("in_channels = {in_channels}"),
                    format!("out_channels = {out}"),
                    format!("kernel_size = {}", pair(*kernel)),
                    format!("stride = {s}"),
                    format!("padding = {}", pair(padding)),
                ]);
                if groups > 1 {
                    t.push(format!("groups = {groups}"));
                }
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("conv2d {in_channels}→{out}, {} kernel", dims(kernel)),
                );
                // Output size: ⌊(H + 2·padding − kernel) / stride⌋ + 1.
                let size = |h: usize, a: usize| {
                    (h + 2 * padding[a])
                        .checked_sub(kernel[a])
                        .map_or(0, |v| v / s + 1)
                };
                flow.shape = match &flow.shape {
                    Some(sh) if sh.len() == 3 => Some(vec![*out, size(sh[1], 0), size(sh[2], 1)]),
                    _ => None,
                };
                flow.after_conv = true;
                channels = Some(*out);
            }
            Kind::BatchNorm { c, affine, running } => {
                let two_d = match &flow.shape {
                    Some(s) => s.len() == 3,
                    None => flow.after_conv,
                };
                let ty = if two_d {
                    "batch_norm2d"
                } else {
                    "batch_norm1d"
                };
                let have = match &flow.shape {
                    Some(s) if s.len() >= 2 => Some(s[0]),
                    Some(s) => s.first().copied(),
                    None => channels,
                };
                if have.is_some_and(|h| h != *c) {
                    o.todo(&format!(
                        "'{}' normalises {c} channels but the layer before gives {}: check the \
                         layer order.",
                        m.path,
                        have.unwrap_or(0)
                    ));
                }
                let mut t = head.clone();
                t.extend([format!("type = \"{ty}\""), format!("num_features = {c}")]);
                if !affine {
                    t.push("affine = false".into());
                }
                if !running {
                    t.push("track_running_stats = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("{ty} {c}"),
                );
            }
            Kind::LayerNorm { c, bias } => {
                let mut t = head.clone();
                t.extend([
                    "type = \"layer_norm\"".into(),
                    format!("normalized_shape = {c}"),
                ]);
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("layer_norm {c}"),
                );
            }
            Kind::Embedding {
                num,
                dim,
                positional,
            } => {
                let ty = if *positional {
                    if let Some(s) = &flow.shape
                        && let Some(&t) = s.last()
                        && t > *num
                    {
                        o.todo(&format!(
                            "'{}' holds {num} positions but the sequences are {t} long.",
                            m.path
                        ));
                    }
                    o.todo(&format!(
                        "'{}' is read as a learned position table (nanoGPT's wpe): rows 0..T \
                         of it, added to the token embeddings. If it is a second token \
                         embedding, make it type = \"embedding\".",
                        m.path
                    ));
                    "positional_embedding"
                } else {
                    "embedding"
                };
                let mut t = head.clone();
                t.extend([
                    format!("type = \"{ty}\""),
                    format!("num_embeddings = {num}"),
                    format!("embedding_dim = {dim}"),
                ]);
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("{ty} {num}×{dim}"),
                );
                flow.shape = flow.shape.take().map(|mut s| {
                    s.push(*dim);
                    s
                });
                channels = Some(*dim);
            }
            Kind::Attention { mha, c, bias } => {
                let heads = guess_heads(*c);
                let divisors: Vec<String> = (1..=*c)
                    .filter(|h| c.is_multiple_of(*h))
                    .map(|h| h.to_string())
                    .collect();
                o.todo(&format!(
                    "'{}' is multi-head self-attention ({}, {c} channels). The number of heads \
                     is not stored: {heads} guessed ({}); {c} channels split into {} heads. \
                     Set your model's {}.",
                    m.path,
                    if *mha {
                        "nn.MultiheadAttention: in_proj_weight [3C, C] holds q, k, v"
                    } else {
                        "nanoGPT CausalSelfAttention: c_attn [3C, C] holds q, k, v"
                    },
                    if heads == 1 {
                        "one head, as the channels are not a multiple of GPT-2's head size 64"
                    } else {
                        "head size 64, as GPT-2"
                    },
                    divisors.join(", "),
                    if *mha { "num_heads" } else { "n_head" }
                ));
                let mut t = head.clone();
                if *mha {
                    o.todo(
                        "causal mask guessed (mha(x, x, x, attn_mask=causal mask), as a language \
                         model): set causal = false if forward() passes no mask.",
                    );
                    t.extend([
                        "type = \"multihead_attention\"".into(),
                        format!("embed_dim = {c}"),
                        format!("num_heads = {heads}"),
                        "causal = true".into(),
                    ]);
                } else {
                    t.extend([
                        "type = \"causal_self_attention\"".into(),
                        format!("n_embd = {c}"),
                        format!("n_head = {heads}"),
                    ]);
                }
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("self-attention {c}, {heads} head(s)"),
                );
            }
            Kind::Other { what } => {
                o.todo(&format!(
                    "module '{}' ({what}) is not a layer lca init recognises; left out. Its \
                     tensors:",
                    m.path
                ));
                for t in &m.tensors {
                    o.line(format!("#     {}  {} {:?}", t.full, t.dtype, t.shape));
                }
                o.line("");
                skipped.push(m.path.clone());
            }
        }
        shapes.insert(m.path.clone(), flow.shape.clone());
        // An activation after a linear or conv layer (after its norm, if one follows), except
        // after the last one; inside a recognised block, where the block puts them.
        let next_is_norm = modules.get(i + 1).is_some_and(|n| {
            matches!(n.kind, Kind::BatchNorm { .. })
                && matches!(m.kind, Kind::Linear { .. } | Kind::Conv2d { .. })
        });
        let ends_hidden = match m.kind {
            Kind::Linear { .. } | Kind::Conv2d { .. } => Some(i),
            Kind::BatchNorm { .. } if i > 0 => Some(i - 1),
            _ => None,
        };
        if let Some(j) = ends_hidden
            && !p.planned
            && !next_is_norm
            && Some(j) != last_weighted
            && weighted.contains(&j)
            && last_weighted.is_some_and(|l| l > i)
        {
            o.todo(&format!(
                "activation not stored in a checkpoint: {activation} guessed after '{}' (or \
                 tanh, sigmoid, gelu, leaky_relu; none if the model has none).",
                m.path
            ));
            write_table(&mut o, &[format!("type = \"{activation}\"")]);
        }
        for extra in &p.after {
            match extra {
                Extra::Act(name) => {
                    let mut t = Vec::new();
                    if let Some(n) = name {
                        t.push(format!("name = {}", quote(n)));
                        shapes.insert(n.clone(), flow.shape.clone());
                    }
                    t.push(format!("type = \"{activation}\""));
                    write_table(&mut o, &t);
                }
                Extra::Add { name, inputs } => {
                    let inputs: Vec<String> = inputs
                        .iter()
                        .map(|r| match r {
                            Ref::BlockInput => block_in
                                .as_ref()
                                .map_or("input".to_string(), |b| b.0.clone()),
                            Ref::Layer(n) => n.clone(),
                        })
                        .collect();
                    let known: Vec<&Vec<usize>> = inputs
                        .iter()
                        .filter_map(|n| shapes.get(n).and_then(|s| s.as_ref()))
                        .collect();
                    let list = inputs
                        .iter()
                        .map(|n| quote(n))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let t = vec![
                        format!("name = {}", quote(name)),
                        "type = \"add\"".into(),
                        format!("input = [{list}]"),
                    ];
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
                        write_table(&mut o, &t);
                        if let Some(s) = known.first() {
                            flow.shape = Some(s.to_vec());
                        }
                        shapes.insert(name.clone(), flow.shape.clone());
                    }
                }
            }
        }
    }

    // Loss.
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
    o.line(if loss_ce {
        "type = \"cross_entropy\""
    } else {
        "type = \"mse\""
    });
    o.line("");

    // Data.
    o.line("[data]");
    match data {
        Some(d) => {
            o.line(format!(
                "train = {}",
                quote(&spec_path(&d.path, &spec_dir).to_string_lossy())
            ));
            if let Some(t) = &d.tokens {
                o.todo(&format!(
                    "'{t}' holds token ids [N, T+1] = [{}, {}]: each row gives the inputs (its \
                     first {} ids) and the next-token targets (its last {}).",
                    d.samples,
                    d.sample_shape.first().map_or(0, |t| t + 1),
                    d.sample_shape.first().copied().unwrap_or(0),
                    d.sample_shape.first().copied().unwrap_or(0),
                ));
                o.line(format!("tokens = {}", quote(t)));
            } else {
                if d.names_guessed {
                    o.todo(&format!(
                        "the data file has no tensors named x and y: '{}' taken as the inputs \
                         and '{}' as the targets.",
                        d.x, d.y
                    ));
                }
                o.line(format!("x = {}", quote(&d.x)));
                o.line(format!("y = {}", quote(&d.y)));
            }
            let token_ids = matches!(
                first_weighted.map(|m| &m.kind),
                Some(Kind::Embedding { .. })
            );
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
                o.line(format!("scale = {scale:?}"));
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
                .map(|v| spec_path(v, &spec_dir).to_string_lossy().to_string());
            o.todo(&format!(
                "a held-out set to allocate along the same path? Uncomment{}:",
                if val.is_some() {
                    " (this file was found next to the training set)"
                } else {
                    " and set the path"
                }
            ));
            o.line(format!(
                "# validation = {}",
                quote(val.as_deref().unwrap_or("val.safetensors"))
            ));
        }
        None => {
            o.todo(
                "the training set (no --data given): a .safetensors or .npz file with inputs x \
                 [N, ...] and targets y; set its path (relative to this file) and preprocessing.",
            );
            o.line("train = \"train.safetensors\"");
            o.line("x = \"x\"");
            o.line("y = \"y\"");
        }
    }
    o.line("");
    o.line("[eval]");
    o.line("chunk_size = 256");
    o.line("");
    o.todo(
        "an explicit L2 term λ‖θ‖² in the training objective? Uncomment and set λ (its LCA is \
         reported in its own column; SGD's weight_decay = wd is λ = wd / 2):",
    );
    o.line("# [regularization]");
    o.line("# l2 = 1e-4");

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

