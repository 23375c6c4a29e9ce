//! `torch.save` files read without PyTorch and without executing pickle code.
//!
//! A restricted unpickler: a small stack machine that knows the opcodes of pickle protocols
//! 0–5 that `torch.save` emits and resolves `GLOBAL`s only from a fixed allow-list
//! ([`allowed`]): `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_parameter`, the `torch.*Storage` types of persistent ids, and a few inert data
//! classes found beside state dicts (Lightning's `AttributeDict`, `argparse.Namespace`, ...),
//! which become opaque values. Nothing is ever imported or called: a `GLOBAL` outside the list
//! (`os.system`, `builtins.eval`, any model class) refuses the whole file, naming it.
//! Containers live in an arena (flat, so no recursion on hostile nesting), and every length
//! read from the file is checked against the bytes that remain before anything is allocated.
//!
//! Both layouts are read: the zip archive of PyTorch ≥ 1.6 (`<name>/data.pkl` and one entry
//! `<name>/data/<key>` per storage) and the legacy stream (magic number, protocol, system
//! info, the object, the storage keys, then each storage as an 8-byte element count and its
//! bytes).

use std::collections::HashMap;
use std::rc::Rc;

/// A tensor of a state dict: name, safetensors dtype, shape and its bytes (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// What a `torch.save` file held: its tensors (in the dict's order) and the training step
/// when the object carries one (`global_step`, `step`, `iter_num`).
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub tensors: Vec<RawTensor>,
    pub step: Option<u64>,
    /// Where the tensors were found, e.g. "the `state_dict` entry (its `model.` prefix removed)".
    pub found_in: String,
}

/// The magic number the legacy format starts with (0x1950a86a20f9469cfc6c), as the
/// little-endian bytes of a pickle LONG1.
const LEGACY_MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// The storage types of persistent ids: dtype (as safetensors names it) and element size.
fn storage_dtype(name: &str) -> Option<(&'static str, usize)> {
    Some(match name.strip_prefix("torch.")? {
        "FloatStorage" => ("F32", 4),
        "DoubleStorage" => ("F64", 8),
        "HalfStorage" => ("F16", 2),
        "BFloat16Storage" => ("BF16", 2),
        "LongStorage" => ("I64", 8),
        "IntStorage" => ("I32", 4),
        "ShortStorage" => ("I16", 2),
        "CharStorage" => ("I8", 1),
        "ByteStorage" => ("U8", 1),
        "BoolStorage" => ("BOOL", 1),
        _ => return None,
    })
}

/// Globals that may appear: what a state dict needs, and inert data classes that become
/// opaque values (never constructed).
fn allowed(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "collections.OrderedDict",
        "builtins.dict",
        "builtins.list",
        "builtins.set",
        "builtins.frozenset",
        "builtins.tuple",
        "builtins.slice",
        "builtins.complex",
        "builtins.bytearray",
        "_codecs.encode",
        "collections.defaultdict",
        "argparse.Namespace",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.torch_version.TorchVersion",
        "torch.device",
        "torch.Size",
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
    ];
    EXACT.contains(&name)
        || storage_dtype(name).is_some()
        || name.ends_with(".AttributeDict")
            && (name.starts_with("pytorch_lightning.") || name.starts_with("lightning."))
        || name.strip_prefix("torch.").is_some_and(|d| {
            [
                "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "bool",
            ]
            .contains(&d)
        })
}

// Scalars are kept (with their values, for `Debug` in messages) though only integers are read.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64 (only its presence matters).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes,
    /// A list, tuple or dict in the arena.
    Node(usize),
    Global(Rc<str>),
    /// An index into the storages.
    Storage(usize),
    /// An index into the tensors.
    Tensor(usize),
    /// An instance of an allowed data class (not constructed).
    Obj(Rc<str>),
}

#[derive(Debug)]
enum Node {
    List(Vec<V>),
    Tuple(Vec<V>),
    Dict(Vec<(V, V)>),
}

/// The named tensors of the state dict, the step, and where they were found.
type Found = (Vec<(String, usize)>, Option<u64>, String);

#[derive(Debug, Clone)]
struct Storage {
    key: String,
    dtype: &'static str,
    elsize: usize,
    numel: u64,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage: usize,
    offset: u64,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The result of one pickle: the object and the storages and tensors it refers to.
struct Unpickled {
    top: V,
    nodes: Vec<Node>,
    storages: Vec<Storage>,
    tensors: Vec<TensorRef>,
    /// Bytes consumed.
    end: usize,
}

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u64, V>,
    nodes: Vec<Node>,
    storages: Vec<Storage>,
    storage_keys: HashMap<String, usize>,
    tensors: Vec<TensorRef>,
}

type R<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.b.len() - self.pos {
            return Err(format!(
                "truncated: {n} byte(s) needed at offset {}, {} left",
                self.pos,
                self.b.len() - self.pos
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> R<&'a str> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("truncated: a text argument has no end of line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a text argument is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: u64) -> R<Rc<str>> {
        let n = usize::try_from(n).map_err(|_| "a string length does not fit in memory")?;
        let raw = self.take(n)?;
        Ok(Rc::from(String::from_utf8_lossy(raw).as_ref()))
    }
    fn pop(&mut self) -> R<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("stack underflow at offset {}", self.pos));
        }
        Ok(self.stack.pop().expect("checked"))
    }
    fn top(&self) -> R<&V> {
        self.stack
            .last()
            .ok_or_else(|| format!("empty stack at offset {}", self.pos))
    }
    fn pop_mark(&mut self) -> R<Vec<V>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("no MARK at offset {}", self.pos))?;
        Ok(self.stack.split_off(m))
    }
    fn node(&mut self, n: Node) -> V {
        self.nodes.push(n);
        V::Node(self.nodes.len() - 1)
    }
    fn global(&mut self, module: &str, name: &str) -> R<V> {
        let full = format!("{module}.{name}");
        if !allowed(&full) {
            return Err(format!(
                "refused: the pickle names `{full}`, which is not one of the classes and functions a state dict needs \
                 (lca never runs pickle code; re-save the weights with safetensors, or torch.save(model.state_dict()))"
            ));
        }
        Ok(V::Global(Rc::from(full)))
    }
    fn tuple_items(&self, v: &V) -> Option<&[V]> {
        match v {
            V::Node(i) => match &self.nodes[*i] {
                Node::Tuple(t) | Node::List(t) => Some(t),
                Node::Dict(_) => None,
            },
            _ => None,
        }
    }
    fn ints(&self, v: &V) -> R<Vec<usize>> {
        self.tuple_items(v)
            .ok_or("a tensor's size or stride is not a tuple")?
            .iter()
            .map(|x| match x {
                V::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => {
                    Err("a tensor's size or stride is not a tuple of non-negative integers".into())
                }
            })
            .collect()
    }
    fn persistent(&mut self, pid: V) -> R<V> {
        let items = self
            .tuple_items(&pid)
            .ok_or("a persistent id is not a tuple")?
            .to_vec();
        let bad = || "a persistent id is not ('storage', type, key, location, numel)".to_string();
        if items.len() < 5 || !matches!(&items[0], V::Str(s) if &**s == "storage") {
            return Err(bad());
        }
        let (dtype, elsize) = match &items[1] {
            V::Global(g) => {
                storage_dtype(g).ok_or_else(|| format!("storage type `{g}` is not supported"))?
            }
            _ => return Err(bad()),
        };
        let key = match &items[2] {
            V::Str(s) => s.to_string(),
            V::Int(i) => i.to_string(),
            _ => return Err(bad()),
        };
        let numel = match &items[4] {
            V::Int(n) if *n >= 0 => *n as u64,
            _ => return Err(bad()),
        };
        if let Some(&i) = self.storage_keys.get(&key) {
            return Ok(V::Storage(i));
        }
        self.storages.push(Storage {
            key: key.clone(),
            dtype,
            elsize,
            numel,
        });
        self.storage_keys.insert(key, self.storages.len() - 1);
        Ok(V::Storage(self.storages.len() - 1))
    }
    fn reduce(&mut self, f: V, args: V) -> R<V> {
        let V::Global(name) = &f else {
            return Err(format!("REDUCE of a {f:?}, not of a class or function"));
        };
        let args = self.tuple_items(&args).unwrap_or(&[]).to_vec();
        match &**name {
            "collections.OrderedDict" | "builtins.dict" => Ok(self.node(Node::Dict(Vec::new()))),
            "torch._utils._rebuild_tensor_v2" => {
                if args.len() < 4 {
                    return Err("_rebuild_tensor_v2 with fewer than 4 arguments".into());
                }
                let V::Storage(storage) = args[0] else {
                    return Err("_rebuild_tensor_v2 of something that is not a storage".into());
                };
                let offset = match args[1] {
                    V::Int(o) if o >= 0 => o as u64,
                    _ => return Err("_rebuild_tensor_v2 with a bad storage offset".into()),
                };
                let shape = self.ints(&args[2])?;
                let stride = self.ints(&args[3])?;
                if shape.len() != stride.len() {
                    return Err("a tensor's size and stride differ in length".into());
                }
                self.tensors.push(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                });
                Ok(V::Tensor(self.tensors.len() - 1))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                match args.first() {
                    Some(t @ V::Tensor(_)) => Ok(t.clone()),
                    _ => Err("_rebuild_parameter of something that is not a tensor".into()),
                }
            }
            other => Ok(V::Obj(Rc::from(other))),
        }
    }

    fn set_items(&mut self, target: &V, pairs: Vec<(V, V)>) {
        if let V::Node(i) = target
            && let Node::Dict(d) = &mut self.nodes[*i]
        {
            d.extend(pairs);
        }
    }
    fn append(&mut self, target: &V, items: Vec<V>) {
        if let V::Node(i) = target
            && let Node::List(l) = &mut self.nodes[*i]
        {
            l.extend(items);
        }
    }

    /// Whether `op` pushes one constant (number, string, bytes, None, bool).
    fn is_scalar_op(op: u8) -> bool {
        matches!(
            op,
            b'N' | 0x88
                | 0x89
                | b'J'
                | b'K'
                | b'M'
                | 0x8a
                | 0x8b
                | b'I'
                | b'L'
                | b'G'
                | b'F'
                | 0x8c
                | b'X'
                | 0x8d
                | b'U'
                | b'T'
                | b'V'
                | b'S'
                | b'C'
                | b'B'
                | 0x8e
                | 0x96
        )
    }

    /// The constant a [`Self::is_scalar_op`] opcode pushes, its argument read from the stream.
    fn scalar(&mut self, op: u8) -> R<V> {
        match op {
            b'N' => return Ok(V::None),
            0x88 => return Ok(V::Bool(true)),
            0x89 => return Ok(V::Bool(false)),
            b'J' => {
                let v = self.u32()? as i32;
                return Ok(V::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                return Ok(V::Int(v.into()));
            }
            b'M' => {
                let v = self.u16()?;
                return Ok(V::Int(v.into()));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8()? as u64
                } else {
                    self.u32()? as u64
                };
                let n = usize::try_from(n).map_err(|_| "LONG too long")?;
                let raw = self.take(n)?;
                return Ok(long(raw));
            }
            b'I' | b'L' => {
                let s = self.line()?.trim_end_matches('L');
                return Ok(match s {
                    "00" => V::Bool(false),
                    "01" => V::Bool(true),
                    _ => s.parse().map(V::Int).unwrap_or(V::BigInt),
                });
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                return Ok(V::Float(v));
            }
            b'F' => {
                let v = self.line()?.parse().map_err(|_| "bad FLOAT")?;
                return Ok(V::Float(v));
            }
            0x8c => {
                let n = self.u8()? as u64;
                let s = self.string(n)?;
                return Ok(V::Str(s));
            }
            b'X' => {
                let n = self.u32()? as u64;
                let s = self.string(n)?;
                return Ok(V::Str(s));
            }
            0x8d => {
                let n = self.u64()?;
                let s = self.string(n)?;
                return Ok(V::Str(s));
            }
            b'U' => {
                let n = self.u8()? as u64;
                let s = self.string(n)?;
                return Ok(V::Str(s));
            }
            b'T' => {
                let n = self.u32()? as u64;
                let s = self.string(n)?;
                return Ok(V::Str(s));
            }
            b'V' | b'S' => {
                let s = self.line()?.trim_matches(|c| c == '\'' || c == '"');
                let s = Rc::from(s);
                return Ok(V::Str(s));
            }
            b'C' | b'B' | 0x8e | 0x96 => {
                let n = match op {
                    b'C' => self.u8()? as u64,
                    b'B' => self.u32()? as u64,
                    _ => self.u64()?,
                };
                let n = usize::try_from(n).map_err(|_| "BYTES too long")?;
                self.take(n)?;
                return Ok(V::Bytes);
            }
            _ => {}
        }
        Err(format!("opcode 0x{op:02x} pushes no constant"))
    }

    /// Run until STOP.
    fn run(&mut self) -> R<V> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("pickle protocol {p} is not supported"));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => {
                    let v = self.node(Node::Dict(Vec::new()));
                    self.stack.push(v)
                }
                b']' => {
                    let v = self.node(Node::List(Vec::new()));
                    self.stack.push(v)
                }
                b')' => {
                    let v = self.node(Node::Tuple(Vec::new()));
                    self.stack.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.node(Node::Tuple(items));
                    self.stack.push(v)
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.node(Node::List(items));
                    self.stack.push(v)
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return Err(format!("DICT with an odd number of items at offset {at}"));
                    }
                    let pairs = pairs(items);
                    let v = self.node(Node::Dict(pairs));
                    self.stack.push(v)
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.node(Node::Tuple(items));
                    self.stack.push(v)
                }
                op if Self::is_scalar_op(op) => {
                    let v = self.scalar(op)?;
                    self.stack.push(v)
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'p' => {
                    let k = self.line()?.parse().map_err(|_| "bad PUT")?;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' | b'j' | b'g' => {
                    let k = match op {
                        b'h' => self.u8()? as u64,
                        b'j' => self.u32()? as u64,
                        _ => self.line()?.parse().map_err(|_| "bad GET")?,
                    };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or_else(|| format!("memo entry {k} read before it was written"))?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let g = self.global(&module, &name)?;
                    self.stack.push(g)
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (V::Str(m), V::Str(n)) = (module, name) else {
                        return Err("STACK_GLOBAL of non-strings".into());
                    };
                    let g = self.global(&m, &n)?;
                    self.stack.push(g)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.stack.push(v)
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    self.pop()?; // the state: not applied to anything
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v)
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let t = self.top()?.clone();
                    self.set_items(&t, vec![(k, v)]);
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return Err(format!(
                            "SETITEMS with an odd number of items at offset {at}"
                        ));
                    }
                    let t = self.top()?.clone();
                    self.set_items(&t, pairs(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    let t = self.top()?.clone();
                    self.append(&t, vec![v]);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    self.append(&t, items);
                }
                0x8f => {
                    let v = self.node(Node::List(Vec::new()));
                    self.stack.push(v)
                }
                0x90 => {
                    self.pop_mark()?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.node(Node::List(items));
                    self.stack.push(v)
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                0x97 => {} // NEXT_BUFFER / READONLY_BUFFER are not used by torch.save
                other => {
                    return Err(format!(
                        "pickle opcode 0x{other:02x} at offset {at} is not one torch.save writes"
                    ));
                }
            }
        }
    }
}

fn pairs(items: Vec<V>) -> Vec<(V, V)> {
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

fn long(raw: &[u8]) -> V {
    if raw.is_empty() {
        return V::Int(0);
    }
    if raw.len() > 8 {
        return V::BigInt;
    }
    let neg = raw[raw.len() - 1] & 0x80 != 0;
    let mut b = [if neg { 0xff } else { 0 }; 8];
    b[..raw.len()].copy_from_slice(raw);
    V::Int(i64::from_le_bytes(b))
}

fn unpickle(b: &[u8]) -> R<Unpickled> {
    let mut m = Machine {
        b,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        nodes: Vec::new(),
        storages: Vec::new(),
        storage_keys: HashMap::new(),
        tensors: Vec::new(),
    };
    let top = m.run()?;
    Ok(Unpickled {
        top,
        nodes: m.nodes,
        storages: m.storages,
        tensors: m.tensors,
        end: m.pos,
    })
}

impl Unpickled {
    fn dict(&self, v: &V) -> Option<&[(V, V)]> {
        match v {
            V::Node(i) => match &self.nodes[*i] {
                Node::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        }
    }
    fn get(&self, d: &[(V, V)], key: &str) -> Option<V> {
        d.iter()
            .rev()
            .find(|(k, _)| matches!(k, V::Str(s) if &**s == key))
            .map(|(_, v)| v.clone())
    }
    /// The named tensors of a dict whose values are tensors (others skipped), or None when it
    /// holds no tensor.
    fn tensors_of(&self, d: &[(V, V)]) -> Option<Vec<(String, usize)>> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for (k, v) in d {
            if let (V::Str(k), V::Tensor(t)) = (k, v) {
                out.retain(|(n, _)| n != &**k);
                out.push((k.to_string(), *t));
            }
        }
        (!out.is_empty()).then_some(out)
    }
    /// Short description of the object, for messages.
    fn describe(&self, v: &V) -> String {
        match v {
            V::Node(i) => match &self.nodes[*i] {
                Node::Dict(d) => {
                    let keys: Vec<String> = d
                        .iter()
                        .take(8)
                        .map(|(k, _)| match k {
                            V::Str(s) => format!("'{s}'"),
                            other => format!("{other:?}"),
                        })
                        .collect();
                    format!(
                        "a dict of {} entr{} ({}{})",
                        d.len(),
                        if d.len() == 1 { "y" } else { "ies" },
                        keys.join(", "),
                        if d.len() > 8 { ", ..." } else { "" }
                    )
                }
                Node::List(l) => format!("a list of {} item(s)", l.len()),
                Node::Tuple(t) => format!("a tuple of {} item(s)", t.len()),
            },
            V::Tensor(_) => "a single tensor".into(),
            V::Obj(c) => format!("an object of class {c}"),
            other => format!("{other:?}"),
        }
    }
    /// Find the state dict: the object itself, or its `state_dict` / `model_state_dict` /
    /// `model` / `module` / `net` / `state` entry (Lightning `.ckpt`, nanoGPT, common
    /// training scripts).
    fn state_dict(&self) -> R<Found> {
        let Some(d) = self.dict(&self.top) else {
            return Err(format!(
                "holds {}, not a state dict (torch.save(model.state_dict()) gives one)",
                self.describe(&self.top)
            ));
        };
        let step = ["global_step", "step", "iter_num"]
            .iter()
            .find_map(|k| match self.get(d, k) {
                Some(V::Int(s)) if s >= 0 => Some(s as u64),
                _ => None,
            });
        if let Some(t) = self.tensors_of(d) {
            return Ok((t, step, "the top-level dict".into()));
        }
        for key in [
            "state_dict",
            "model_state_dict",
            "model",
            "module",
            "net",
            "state",
        ] {
            if let Some(inner) = self
                .get(d, key)
                .and_then(|v| self.dict(&v).map(<[_]>::to_vec))
                && let Some(mut t) = self.tensors_of(&inner)
            {
                let mut found = format!("its `{key}` entry");
                if key == "state_dict" && t.iter().all(|(n, _)| n.starts_with("model.")) {
                    for (n, _) in &mut t {
                        n.drain(..6);
                    }
                    found.push_str(" (the `model.` prefix of every name removed)");
                }
                return Ok((t, step, found));
            }
        }
        Err(format!(
            "holds {} without tensors at the top level or under `state_dict`, `model_state_dict`, `model`, `module`, `net` or `state`",
            self.describe(&self.top)
        ))
    }

    /// The tensors, their bytes gathered from `storage(index)` (the storage's raw bytes).
    fn materialise<'s>(&self, mut storage: impl FnMut(&Storage) -> R<&'s [u8]>) -> R<StateDict> {
        let (named, step, found_in) = self.state_dict()?;
        let mut out = Vec::with_capacity(named.len());
        for (name, t) in named {
            let t = &self.tensors[t];
            let s = &self.storages[t.storage];
            let bytes = storage(s)?;
            let data = gather(bytes, s, t).map_err(|e| format!("tensor '{name}': {e}"))?;
            out.push(RawTensor {
                name,
                dtype: s.dtype,
                shape: t.shape.clone(),
                data,
            });
        }
        Ok(StateDict {
            tensors: out,
            step,
            found_in,
        })
    }
}

/// Copy a (possibly strided) view out of its storage, every index checked first.
fn gather(bytes: &[u8], s: &Storage, t: &TensorRef) -> R<Vec<u8>> {
    let es = s.elsize;
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("its size overflows")?;
    let have = (bytes.len() / es) as u64;
    if numel == 0 {
        return Ok(Vec::new());
    }
    // The largest element index the view reads.
    let mut last = t.offset;
    for (&d, &st) in t.shape.iter().zip(&t.stride) {
        last = (d as u64 - 1)
            .checked_mul(st as u64)
            .and_then(|x| x.checked_add(last))
            .ok_or("its extent overflows")?;
    }
    if last >= have {
        return Err(format!(
            "reads element {last} of a storage of {have} element(s) (the file is damaged)"
        ));
    }
    let contiguous = {
        let mut expect = 1usize;
        let mut ok = true;
        for (&d, &st) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && st != expect {
                ok = false;
            }
            expect *= d;
        }
        ok
    };
    let start = t.offset as usize * es;
    if contiguous {
        return Ok(bytes[start..start + numel * es].to_vec());
    }
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let off = t.offset as usize + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&bytes[off * es..(off + 1) * es]);
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < t.shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok(out)
}

/// Whether `b` is a zip archive.
pub fn is_zip(b: &[u8]) -> bool {
    b.starts_with(b"PK\x03\x04") || b.starts_with(b"PK\x05\x06")
}

/// Whether `b` starts like a pickle (a PROTO opcode).
pub fn is_pickle(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] == 0x80 && (2..=5).contains(&b[1])
}

/// Read the state dict of a `torch.save` zip archive.
pub fn read_zip(b: &[u8]) -> R<StateDict> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(b))
        .map_err(|e| format!("a damaged zip archive: {e}"))?;
    let names: Vec<String> = z.file_names().map(str::to_string).collect();
    let Some(pkl) = names
        .iter()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .cloned()
    else {
        let mut shown: Vec<&str> = names.iter().map(String::as_str).take(6).collect();
        if names.len() > 6 {
            shown.push("...");
        }
        return Err(format!(
            "a zip archive without data.pkl, so not from torch.save (entries: {})",
            shown.join(", ")
        ));
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let mut read = |name: &str| -> R<Vec<u8>> {
        let mut f = z.by_name(name).map_err(|e| format!("entry {name}: {e}"))?;
        let size = f.size();
        if size > b.len() as u64 {
            return Err(format!(
                "entry {name} declares {size} bytes, more than the whole file ({} bytes)",
                b.len()
            ));
        }
        let mut v = Vec::with_capacity(size as usize);
        std::io::Read::read_to_end(&mut f, &mut v).map_err(|e| format!("entry {name}: {e}"))?;
        Ok(v)
    };
    let big = read(&format!("{prefix}byteorder")).ok();
    if big.as_deref() == Some(b"big") {
        return Err("a big-endian torch.save archive (not supported)".into());
    }
    let p = unpickle(&read(&pkl)?).map_err(|e| format!("{pkl}: {e}"))?;
    let mut data: HashMap<String, Vec<u8>> = HashMap::new();
    for s in &p.storages {
        let name = format!("{prefix}data/{}", s.key);
        let v = read(&name)?;
        let need = s
            .numel
            .checked_mul(s.elsize as u64)
            .ok_or("storage size overflows")?;
        if (v.len() as u64) < need {
            return Err(format!(
                "entry {name} holds {} bytes but its storage declares {} element(s) of {} byte(s)",
                v.len(),
                s.numel,
                s.elsize
            ));
        }
        data.insert(s.key.clone(), v);
    }
    p.materialise(|s| Ok(&data[&s.key][..]))
}

/// Read the state dict of a legacy (`_use_new_zipfile_serialization=False`) file.
pub fn read_legacy(b: &[u8]) -> R<StateDict> {
    let magic = unpickle(b).map_err(|e| format!("its first pickle: {e}"))?;
    let head = &b[..magic.end.min(b.len())];
    if !head.windows(LEGACY_MAGIC.len()).any(|w| w == LEGACY_MAGIC) {
        return Err(format!(
            "a pickle file, not from torch.save (its first object is {}, not torch's magic number)",
            magic.describe(&magic.top)
        ));
    }
    let mut pos = magic.end;
    let proto = unpickle(&b[pos..]).map_err(|e| format!("its protocol pickle: {e}"))?;
    if !matches!(proto.top, V::Int(1001)) {
        return Err("a legacy torch.save file of an unknown protocol version".into());
    }
    pos += proto.end;
    pos += unpickle(&b[pos..])
        .map_err(|e| format!("its system-info pickle: {e}"))?
        .end;
    let main = unpickle(&b[pos..]).map_err(|e| format!("the saved object: {e}"))?;
    pos += main.end;
    let keys = unpickle(&b[pos..]).map_err(|e| format!("the storage key list: {e}"))?;
    pos += keys.end;
    let key_list: Vec<String> = match &keys.top {
        V::Node(i) => match &keys.nodes[*i] {
            Node::List(l) => l
                .iter()
                .map(|k| match k {
                    V::Str(s) => Ok(s.to_string()),
                    _ => Err("a storage key is not a string".to_string()),
                })
                .collect::<R<_>>()?,
            _ => return Err("the storage key list is not a list".into()),
        },
        _ => return Err("the storage key list is not a list".into()),
    };
    let mut spans: HashMap<String, (usize, usize)> = HashMap::new();
    for key in key_list {
        let Some(s) = main.storages.iter().find(|s| s.key == key) else {
            return Err(format!("storage {key} is listed but no tensor uses it"));
        };
        if b.len() - pos < 8 {
            return Err(format!("truncated before storage {key}"));
        }
        let n = u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap());
        pos += 8;
        let len = n
            .checked_mul(s.elsize as u64)
            .filter(|&l| l <= (b.len() - pos) as u64)
            .ok_or_else(|| {
                format!(
                    "storage {key} declares {n} element(s) of {} byte(s), more than the {} byte(s) left in the file",
                    s.elsize,
                    b.len() - pos
                )
            })? as usize;
        spans.insert(key, (pos, len));
        pos += len;
    }
    main.materialise(|s| {
        spans
            .get(&s.key)
            .map(|&(a, n)| &b[a..a + n])
            .ok_or_else(|| format!("storage {} is missing from the file", s.key))
    })
}

/// Read a `torch.save` file of either layout.
pub fn read(b: &[u8]) -> R<StateDict> {
    if is_zip(b) {
        read_zip(b)
    } else {
        read_legacy(b)
    }
}

/// A short description of a pickle stream's content, for files that are not checkpoints.
pub fn describe_legacy(b: &[u8]) -> String {
    match read_legacy(b) {
        Ok(sd) => format!(
            "a pickle file from torch.save (legacy format) holding {} tensor(s)",
            sd.tensors.len()
        ),
        Err(e) if e.starts_with("a pickle file") => e,
        Err(e) => format!("a pickle file from torch.save (legacy format) that lca cannot use: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_global_outside_the_list_is_refused_by_name() {
        // cos\nsystem\n(S'echo hi'\ntR.  — the classic exploit.
        let evil = b"\x80\x02cos\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let e = unpickle(evil).err().unwrap();
        assert!(e.contains("`os.system`"), "{e}");
        let stack_global = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        let e = unpickle(stack_global).err().unwrap();
        assert!(e.contains("`builtins.eval`"), "{e}");
    }

    #[test]
    fn hostile_lengths_and_structures_are_errors() {
        // BINUNICODE declaring 4 GB in a 10-byte stream.
        let e = unpickle(b"\x80\x02X\xff\xff\xff\xff").err().unwrap();
        assert!(e.contains("truncated"), "{e}");
        assert!(unpickle(b"\x80\x02t.").is_err()); // TUPLE without MARK
        assert!(unpickle(b"\x80\x02h\x05.").is_err()); // GET before PUT
        assert!(unpickle(b"\x80\x02.").is_err()); // STOP on an empty stack
        assert!(unpickle(b"\x80\x02\xff").is_err());
        // Deep nesting is flat in the arena: no recursion.
        let mut deep = b"\x80\x02".to_vec();
        for _ in 0..200_000 {
            deep.extend_from_slice(b"]");
        }
        for _ in 0..199_999 {
            deep.extend_from_slice(b"a");
        }
        deep.push(b'.');
        assert!(unpickle(&deep).is_ok());
        assert!(
            read_legacy(b"\x80\x02K\x05.")
                .unwrap_err()
                .contains("not from torch.save")
        );
        assert!(
            read_zip(b"PK\x03\x04garbage")
                .unwrap_err()
                .contains("damaged zip")
        );
    }

    #[test]
    fn truncated_and_mutated_fixtures_are_errors_never_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/torch_formats");
        for f in [
            "zip/step_1.pt",
            "legacy/ckpt_1.pth",
            "lightning/run-v4.ckpt",
        ] {
            let good = std::fs::read(dir.join(f)).unwrap();
            let sd = read(&good).unwrap();
            assert_eq!(sd.tensors.len(), 6, "{f}");
            for cut in (0..good.len()).step_by(97) {
                assert!(read(&good[..cut]).is_err(), "{f} cut at {cut}");
            }
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            for _ in 0..400 {
                let mut bad = good.clone();
                for _ in 0..4 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let i = (seed % bad.len() as u64) as usize;
                    bad[i] = (seed >> 32) as u8;
                }
                let _ = read(&bad);
            }
        }
    }

    #[test]
    fn strided_views_are_gathered() {
        let s = Storage {
            key: "0".into(),
            dtype: "U8",
            elsize: 1,
            numel: 6,
        };
        let bytes = [0u8, 1, 2, 3, 4, 5];
        // A 2x3 matrix transposed: shape [3, 2], stride [1, 3].
        let t = TensorRef {
            storage: 0,
            offset: 0,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(gather(&bytes, &s, &t).unwrap(), vec![0, 3, 1, 4, 2, 5]);
        let oob = TensorRef {
            offset: 5,
            ..t.clone()
        };
        assert!(gather(&bytes, &s, &oob).unwrap_err().contains("damaged"));
    }
}
