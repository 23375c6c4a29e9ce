//! Planning: the blocks whose wiring the draft can guess (ResNet blocks, pre-norm
//! transformer blocks, token + position embeddings) and the layers written around them.

use super::*;
/// The residual block a module belongs to (`layer1.0.conv1` → `layer1.0`), if any.
pub(super) fn block_name(m: &Module) -> Option<String> {
    let b = crate::summarize::block_of(&m.path);
    (b != m.path).then(|| b.to_string())
}

/// A layer the draft writes that has no module: an activation or a residual join.
#[derive(Debug, Clone)]
pub(super) enum Extra {
    /// The model's activation, named or not.
    Act(Option<String>),
    /// An `add` layer of the given inputs.
    Add { name: String, inputs: Vec<Ref> },
}

/// An input of an `add` layer.
#[derive(Debug, Clone)]
pub(super) enum Ref {
    /// The input of the current block (the layer written before its first layer).
    BlockInput,
    Layer(String),
}

/// The first module of a recognised block.
#[derive(Debug, Clone)]
pub(super) enum Start {
    /// A ResNet basic or bottleneck block: convolutions and batch norms, with an optional
    /// shortcut (`shortcut.*`, `downsample.*`) from the block's input.
    Res {
        block: String,
        main_out: usize,
        shortcut: bool,
    },
    /// A pre-norm transformer block: norm, self-attention, norm, MLP.
    PreNorm { block: String },
}

/// What the draft writes around one module, beyond the module's own table.
#[derive(Debug, Clone, Default)]
pub(super) struct Plan {
    pub(super) starts: Option<Start>,
    /// Reads the block's input (written as `input = ...`) rather than the previous layer.
    pub(super) from_block_input: bool,
    /// Reads the model input (`input = "input"`): the embeddings of a language model.
    pub(super) from_model_input: bool,
    /// A convolution that takes the block's stride.
    pub(super) strided: bool,
    /// The block decides the activations after this module.
    pub(super) planned: bool,
    /// Layers written after this module.
    pub(super) after: Vec<Extra>,
}

/// A layer name not used yet: `base`, else `base.2`, `base.3`, … (never `<type>_<index>`,
/// the spec's default names).
pub(super) fn unique(names: &mut BTreeSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 2;
    while names.contains(&name) || name == "input" {
        name = format!("{base}.{k}");
        k += 1;
    }
    names.insert(name.clone());
    name
}

/// Recognise the blocks whose wiring the draft can guess — ResNet blocks, pre-norm
/// transformer blocks, token + position embeddings — and plan their extra layers.
pub(super) fn plan(modules: &[Module], names: &mut BTreeSet<String>) -> Vec<Plan> {
    let mut plans = vec![Plan::default(); modules.len()];
    // Token and position embeddings, joined by an add after the later one.
    let tok = modules
        .iter()
        .position(|m| matches!(m.kind.layer(), Some(LayerKind::Embedding { .. })));
    let pos = modules
        .iter()
        .position(|m| matches!(m.kind.layer(), Some(LayerKind::PositionalEmbedding { .. })));
    if let (Some(t), Some(q)) = (tok, pos) {
        plans[t].from_model_input = true;
        plans[q].from_model_input = true;
        let parent = modules[t].path.rsplit_once('.').map_or("", |p| p.0);
        let name = unique(
            names,
            &if parent.is_empty() {
                "embed_add".to_string()
            } else {
                format!("{parent}.embed_add")
            },
        );
        plans[t.max(q)].after.push(Extra::Add {
            name,
            inputs: vec![
                Ref::Layer(modules[t].path.clone()),
                Ref::Layer(modules[q].path.clone()),
            ],
        });
    }
    let mut i = 0;
    while i < modules.len() {
        let Some(b) = block_name(&modules[i]) else {
            i += 1;
            continue;
        };
        let end = i + modules[i..]
            .iter()
            .take_while(|m| block_name(m).as_ref() == Some(&b))
            .count();
        let members: Vec<usize> = (i..end).collect();
        if members.len() > 1 {
            plan_res_block(modules, &members, &b, &mut plans, names);
            plan_prenorm_block(modules, &members, &b, &mut plans, names);
        }
        i = end;
    }
    plans
}

pub(super) fn plan_res_block(
    modules: &[Module],
    members: &[usize],
    block: &str,
    plans: &mut [Plan],
    names: &mut BTreeSet<String>,
) {
    let is_conv = |i: usize| modules[i].kind.is_conv();
    let is_bn = |i: usize| modules[i].kind.is_batch_norm();
    if !members.iter().all(|&i| is_conv(i) || is_bn(i))
        || members.iter().filter(|&&i| is_conv(i)).count() < 2
    {
        return;
    }
    let shortcut_like = |i: usize| {
        let rest = &modules[i].path[block.len() + 1..];
        let c = rest.split('.').next().unwrap_or(rest).to_ascii_lowercase();
        ["shortcut", "downsample", "skip", "residual", "proj"].contains(&c.as_str())
    };
    let (short, main): (Vec<usize>, Vec<usize>) = members.iter().partition(|&&i| shortcut_like(i));
    if !is_conv(main[0]) || short.first().is_some_and(|&i| !is_conv(i)) {
        return;
    }
    let main_out = main
        .iter()
        .rev()
        .find_map(|&i| match modules[i].kind.layer() {
            Some(LayerKind::Conv2d { out_channels, .. }) => Some(*out_channels),
            _ => None,
        })
        .unwrap_or(0);
    plans[members[0]].starts = Some(Start::Res {
        block: block.to_string(),
        main_out,
        shortcut: !short.is_empty(),
    });
    for &i in members {
        plans[i].planned = true;
    }
    plans[main[0]].from_block_input = true;
    if let Some(&s) = short.first() {
        plans[s].from_block_input = true;
        plans[s].strided = true;
    }
    let strided = main
        .iter()
        .copied()
        .find(|&i| {
            matches!(modules[i].kind.layer(),
                Some(LayerKind::Conv2d { kernel_size, .. }) if kernel_size.0 != [1, 1])
        })
        .unwrap_or(main[0]);
    plans[strided].strided = true;
    // An activation after each convolution (after its batch norm) but the last.
    for (k, &i) in main.iter().enumerate() {
        let next_is_bn = main.get(k + 1).is_some_and(|&j| is_bn(j));
        if k + 1 < main.len() && !(is_conv(i) && next_is_bn) {
            plans[i].after.push(Extra::Act(None));
        }
    }
    let add = unique(names, &format!("{block}.add"));
    let act = unique(names, &format!("{block}.relu"));
    let last = *members.last().expect("members");
    plans[last].after.push(Extra::Add {
        name: add,
        inputs: vec![
            Ref::Layer(modules[*main.last().expect("main")].path.clone()),
            match short.last() {
                Some(&s) => Ref::Layer(modules[s].path.clone()),
                None => Ref::BlockInput,
            },
        ],
    });
    plans[last].after.push(Extra::Act(Some(act)));
}

pub(super) fn plan_prenorm_block(
    modules: &[Module],
    members: &[usize],
    block: &str,
    plans: &mut [Plan],
    names: &mut BTreeSet<String>,
) {
    let kind = |k: usize| modules[members[k]].kind.layer();
    let layer_norm = |k: usize| matches!(kind(k), Some(LayerKind::LayerNorm { .. }));
    if members.len() < 4
        || !layer_norm(0)
        || !modules[members[1]].kind.is(Role::Attention)
        || !layer_norm(2)
        || !(3..members.len()).all(|k| matches!(kind(k), Some(LayerKind::Linear { .. })))
    {
        return;
    }
    plans[members[0]].starts = Some(Start::PreNorm {
        block: block.to_string(),
    });
    for &i in members {
        plans[i].planned = true;
    }
    let add1 = unique(names, &format!("{block}.add1"));
    let add2 = unique(names, &format!("{block}.add2"));
    plans[members[1]].after.push(Extra::Add {
        name: add1.clone(),
        inputs: vec![
            Ref::BlockInput,
            Ref::Layer(modules[members[1]].path.clone()),
        ],
    });
    let mlp = &members[3..];
    for &i in &mlp[..mlp.len() - 1] {
        plans[i].after.push(Extra::Act(None));
    }
    let last = *mlp.last().expect("an MLP layer");
    plans[last].after.push(Extra::Add {
        name: add2,
        inputs: vec![Ref::Layer(add1), Ref::Layer(modules[last].path.clone())],
    });
}
