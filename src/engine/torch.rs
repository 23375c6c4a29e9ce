//! The PyTorch engine: a worker process (`python -m lca.engine.worker`, docs/engines.md)
//! that evaluates the user's `nn.Module`, driven over its binary protocol ([`super::protocol`]).
//!
//! lca starts the worker, reads its `hello` (θ's layout in PyTorch's `state_dict` order),
//! binds that layout to lca's tensor order ([`TorchEngine::bind`]) and from then on sends θ as
//! one raw little-endian buffer per evaluation and reads back the loss and the f64 gradient.
//! The send and receive buffers are allocated once and reused.
//!
//! Failure never hangs: the worker's stdout ending (it died, was killed, or ran out of memory
//! hard) is detected as end of stream and reported with its exit status and the last lines of
//! its stderr; an `error` message is reported with its kind. The worker runs in its own
//! process group (a Ctrl-C at the terminal reaches lca only, which stops at the next
//! evaluation boundary), is killed when the engine is dropped, and on Linux is killed by the
//! kernel when lca dies (`PR_SET_PDEATHSIG`); elsewhere it sees its stdin close and exits.

use super::protocol::{self, ReadError};
use crate::data::DataOrder;
use crate::error::{LcaError, Result};
use crate::eval::{Engine, LossGrad};
use crate::net::{ParamInfo, Real};
use serde_json::{Map, Value, json};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, BufWriter};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of the worker's stderr kept for error messages.
const TAIL_LINES: usize = 30;

/// How to start the worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerConfig {
    /// The Python interpreter; `None`: `$LCA_PYTHON`, else `python3` on `PATH`.
    pub python: Option<PathBuf>,
    /// `--model`: a run directory or its `lca-run.json`, `file.py:factory`,
    /// `package.module:factory`, or an exported `.pt2`.
    pub model: String,
    /// `--spec`: the spec whose `[data]`, `[loss]`, batch-norm mode and chunk size apply.
    pub spec: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N`, `mps`.
    pub device: String,
    /// `f32` or `f64`.
    pub precision: String,
    /// Samples per evaluation chunk (`None`: the worker's default).
    pub chunk_size: Option<usize>,
    /// The row order of the evaluation chunks (`--data-order`, `--data-seed`; the worker
    /// applies it with batch statistics only and reports what it applied in its hello).
    pub data_order: DataOrder,
    /// Further worker arguments, passed as they are.
    pub extra: Vec<String>,
}

impl WorkerConfig {
    /// The interpreter this configuration starts.
    pub fn python(&self) -> PathBuf {
        self.python
            .clone()
            .or_else(|| std::env::var_os("LCA_PYTHON").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("python3"))
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "-m".into(),
            "lca.engine.worker".into(),
            "--model".into(),
            self.model.clone(),
            "--device".into(),
            self.device.clone(),
            "--precision".into(),
            self.precision.clone(),
        ];
        if let Some(s) = &self.spec {
            a.extend(["--spec".into(), s.display().to_string()]);
        }
        if let Some(c) = self.chunk_size {
            a.extend(["--chunk-size".into(), c.to_string()]);
        }
        match self.data_order {
            DataOrder::File => a.extend(["--data-order".into(), "file".into()]),
            DataOrder::Shuffled { seed } => a.extend([
                "--data-order".into(),
                "shuffled".into(),
                "--data-seed".into(),
                seed.to_string(),
            ]),
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// One tensor of θ as the worker lays it out.
#[derive(Debug, Clone, PartialEq)]
pub struct HelloTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// A buffer (running statistics in running-stats mode), not a parameter.
    pub buffer: bool,
    /// Elements from the start of θ.
    pub offset: usize,
    pub numel: usize,
}

/// The worker's `hello`: versions, settings and θ's layout.
#[derive(Debug, Clone)]
pub struct Hello {
    pub raw: Map<String, Value>,
    pub tensors: Vec<HelloTensor>,
    /// (other name, name in `tensors`) of tied parameters.
    pub aliases: Vec<(String, String)>,
    pub numel: usize,
    pub torch: String,
    pub device: String,
    pub precision: String,
    pub chunk_size: usize,
    pub n_samples: usize,
    pub loss: String,
    /// `running-stats`, `batch-stats`, or `None` (no batch norm).
    pub batch_norm: Option<String>,
    /// The row order the worker evaluates in (`data_order`, `data_seed`; file order when the
    /// hello does not say).
    pub order: DataOrder,
}

fn bad_hello(msg: impl std::fmt::Display) -> LcaError {
    LcaError::Engine(format!("the PyTorch worker's hello is malformed: {msg}"))
}

impl Hello {
    /// Read a hello header.
    pub fn parse(raw: Map<String, Value>) -> Result<Hello> {
        let s = |k: &str| raw.get(k).and_then(Value::as_str).map(String::from);
        let n = |k: &str| {
            raw.get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| bad_hello(format!("no integer `{k}`")))
        };
        let mut tensors = Vec::new();
        for t in raw
            .get("tensors")
            .and_then(Value::as_array)
            .ok_or_else(|| bad_hello("no `tensors` list"))?
        {
            let name = t["name"]
                .as_str()
                .ok_or_else(|| bad_hello("a tensor without a name"))?;
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .ok_or_else(|| bad_hello(format!("tensor '{name}' has no shape")))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad_hello(format!("tensor '{name}' has a bad shape")))?;
            let offset = t["offset"]
                .as_u64()
                .ok_or_else(|| bad_hello(format!("tensor '{name}' has no offset")))?
                as usize;
            let numel: usize = shape.iter().product();
            tensors.push(HelloTensor {
                name: name.into(),
                shape,
                buffer: t["kind"].as_str() == Some("buffer"),
                offset,
                numel,
            });
        }
        let numel = n("numel")?;
        let mut at = 0;
        for t in &tensors {
            if t.offset != at {
                return Err(bad_hello(format!(
                    "tensor '{}' starts at {} instead of {at}",
                    t.name, t.offset
                )));
            }
            at += t.numel;
        }
        if at != numel {
            return Err(bad_hello(format!(
                "the tensors hold {at} values, `numel` says {numel}"
            )));
        }
        let aliases = raw
            .get("aliases")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Hello {
            tensors,
            aliases,
            numel,
            torch: s("torch").unwrap_or_default(),
            device: s("device").unwrap_or_default(),
            precision: s("precision").unwrap_or_default(),
            chunk_size: n("chunk_size")?,
            n_samples: n("n_samples")?,
            loss: s("loss").unwrap_or_default(),
            batch_norm: s("batch_norm"),
            order: DataOrder::from_parts(
                raw.get("data_order").and_then(Value::as_str),
                raw.get("data_seed").and_then(Value::as_u64),
            )
            .ok_or_else(|| {
                bad_hello("`data_order` is not \"file\" or \"shuffled\" with a `data_seed`")
            })?,
            raw,
        })
    }

    /// θ's tensors as lca's parameter list, in the worker's order, for a run without a spec:
    /// each tensor's group is its module path (`layer1.0.conv1` for `layer1.0.conv1.weight`),
    /// its role the last name component.
    pub fn params(&self) -> Vec<ParamInfo> {
        self.tensors
            .iter()
            .map(|t| {
                let (layer, role) = match t.name.rsplit_once('.') {
                    Some((l, r)) => (l.to_string(), r.to_string()),
                    None => (t.name.clone(), t.name.clone()),
                };
                ParamInfo {
                    name: t.name.clone(),
                    layer,
                    role,
                    shape: t.shape.clone(),
                    buffer: t.buffer,
                    aliases: self
                        .aliases
                        .iter()
                        .filter(|(_, to)| *to == t.name)
                        .map(|(from, _)| from.clone())
                        .collect(),
                }
            })
            .collect()
    }
}

/// The child process and its pipes.
struct Worker {
    child: Child,
    stdin: Option<BufWriter<ChildStdin>>,
    stdout: BufReader<ChildStdout>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    send: Vec<u8>,
    recv: Vec<u8>,
    next_id: u64,
    /// Set once the worker is gone: every later request fails with this.
    dead: Option<String>,
    python: PathBuf,
}

impl Worker {
    fn spawn(cfg: &WorkerConfig) -> Result<Worker> {
        let python = cfg.python();
        let mut cmd = Command::new(&python);
        cmd.args(cfg.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a terminal Ctrl-C goes to lca, which stops cleanly.
            cmd.process_group(0);
            #[cfg(target_os = "linux")]
            // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| {
            LcaError::Engine(format!(
                "cannot start the PyTorch worker with `{}`: {e} (choose the Python that has torch and the lca package with --python or $LCA_PYTHON)",
                python.display()
            ))
        })?;
        let stdin = child.stdin.take().map(BufWriter::new);
        let stdout = BufReader::with_capacity(1 << 20, child.stdout.take().expect("piped"));
        let stderr = child.stderr.take().expect("piped");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t = Arc::clone(&tail);
        let echo = std::env::var_os("LCA_WORKER_STDERR").is_some_and(|v| v != "0");
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n').map_while(|l| l.ok()) {
                let line = String::from_utf8_lossy(&line).into_owned();
                if echo {
                    eprintln!("worker: {line}");
                }
                let mut q = t.lock().unwrap_or_else(|e| e.into_inner());
                if q.len() == TAIL_LINES {
                    q.pop_front();
                }
                q.push_back(line);
            }
        });
        Ok(Worker {
            child,
            stdin,
            stdout,
            tail,
            stderr_thread: Some(stderr_thread),
            send: Vec::new(),
            recv: Vec::new(),
            next_id: 0,
            dead: None,
            python,
        })
    }

    /// The worker is gone: wait for it (briefly), and describe how it ended.
    fn died(&mut self, during: &str) -> LcaError {
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
            }
        };
        if let Some(h) = self.stderr_thread.take() {
            let _ = h.join();
        }
        let how = match status {
            Some(s) => describe_status(s),
            None => "its exit status is unknown".into(),
        };
        let msg = format!(
            "the PyTorch worker ({} -m lca.engine.worker) died {during}: {how}{}",
            self.python.display(),
            self.tail_text()
        );
        self.dead = Some(msg.clone());
        LcaError::Engine(msg)
    }

    fn tail_text(&self) -> String {
        let q = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if q.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = q.iter().map(String::as_str).collect();
            format!("; the last lines of its stderr:\n  {}", lines.join("\n  "))
        }
    }

    /// An `error` message from the worker as an lca error.
    fn reported(&mut self, m: &Map<String, Value>, during: &str) -> LcaError {
        let kind = m.get("kind").and_then(Value::as_str).unwrap_or("internal");
        let message = m.get("message").and_then(Value::as_str).unwrap_or("");
        let hint = m
            .get("hint")
            .and_then(Value::as_str)
            .map(|h| format!(" ({h})"))
            .unwrap_or_default();
        let what = match kind {
            "import_error" => "could not load the model",
            "config_error" => "refused its configuration",
            "out_of_memory" => "ran out of device memory",
            "numeric" => return LcaError::Numeric(format!("{message}{hint}")),
            "bad_request" => "refused a request",
            _ => "failed",
        };
        let msg = format!(
            "the PyTorch worker {what} {during} [{kind}]: {message}{hint}{}",
            if kind == "internal" {
                self.tail_text()
            } else {
                String::new()
            }
        );
        if matches!(
            kind,
            "import_error" | "config_error" | "out_of_memory" | "internal"
        ) {
            // Those end the worker: note it so that no later request waits on it.
            self.dead = Some(msg.clone());
            self.stdin = None;
        }
        LcaError::Engine(msg)
    }

    fn read(&mut self, during: &str) -> Result<Map<String, Value>> {
        match protocol::read_message(&mut self.stdout, &mut self.recv) {
            Ok(m) => Ok(m),
            Err(ReadError::Eof) => Err(self.died(during)),
            Err(ReadError::Io(e)) => Err(self.died(&format!("{during} (reading: {e})"))),
            Err(ReadError::Malformed(e)) => {
                let _ = self.child.kill();
                let err = self.died(during);
                Err(LcaError::Engine(format!(
                    "the PyTorch worker sent a malformed message {during}: {e}; {err}"
                )))
            }
        }
    }
}

fn describe_status(s: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL: killed, e.g. by the out-of-memory killer)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGSEGV => " (SIGSEGV: a crash)",
                libc::SIGINT => " (SIGINT)",
                _ => "",
            };
            return format!("killed by signal {sig}{name}");
        }
    }
    match s.code() {
        Some(c) => format!("exit status {c}"),
        None => "ended".into(),
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // End of stdin ends the worker between requests; it is killed if it does not go.
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The engine: one worker process, θ's layout bound to lca's tensor order.
pub struct TorchEngine<T: Real> {
    worker: RefCell<Worker>,
    pub hello: Hello,
    /// Per lca tensor (lca's order): (offset, numel) in the worker's θ.
    map: Vec<(usize, usize)>,
    _t: PhantomData<T>,
}

impl<T: Real> TorchEngine<T> {
    /// Start the worker and read its hello (or its error). The layout is bound to the
    /// worker's own order until [`TorchEngine::bind`].
    pub fn start(cfg: &WorkerConfig) -> Result<TorchEngine<T>> {
        let mut w = Worker::spawn(cfg)?;
        let m = w.read("while loading the model (before its hello)")?;
        match m.get("cmd").and_then(Value::as_str) {
            Some("hello") => {}
            Some("error") => return Err(w.reported(&m, "while loading the model")),
            other => {
                return Err(LcaError::Engine(format!(
                    "the PyTorch worker answered {other:?} instead of hello"
                )));
            }
        }
        let hello = Hello::parse(m)?;
        let want = if std::mem::size_of::<T>() == 4 {
            "f32"
        } else {
            "f64"
        };
        if hello.precision != want {
            return Err(LcaError::Engine(format!(
                "the PyTorch worker computes in {}, lca asked for {want}",
                hello.precision
            )));
        }
        let map = hello.tensors.iter().map(|t| (t.offset, t.numel)).collect();
        Ok(TorchEngine {
            worker: RefCell::new(w),
            hello,
            map,
            _t: PhantomData,
        })
    }

    /// Bind the worker's layout to lca's tensors `params` (their names or aliases, shapes):
    /// every worker tensor must be exactly one of them.
    pub fn bind(&mut self, params: &[ParamInfo]) -> Result<()> {
        let mut used = vec![false; self.hello.tensors.len()];
        let mut map = Vec::with_capacity(params.len());
        for p in params {
            let alias_target = self
                .hello
                .aliases
                .iter()
                .find(|(from, _)| p.answers_to(from))
                .map(|(_, to)| to.as_str());
            let found = self
                .hello
                .tensors
                .iter()
                .position(|t| p.answers_to(&t.name) || alias_target == Some(t.name.as_str()));
            let Some(i) = found else {
                return Err(LcaError::Engine(format!(
                    "tensor '{}' of the spec is not a coordinate of the PyTorch model (its tensors: {})",
                    p.name,
                    self.names()
                )));
            };
            let t = &self.hello.tensors[i];
            if t.shape != p.shape || t.buffer != p.buffer {
                return Err(LcaError::Engine(format!(
                    "tensor '{}' is a {} of shape {:?} in the PyTorch model but a {} of shape {:?} in the spec",
                    p.name,
                    if t.buffer { "buffer" } else { "parameter" },
                    t.shape,
                    if p.buffer { "buffer" } else { "parameter" },
                    p.shape
                )));
            }
            if used[i] {
                return Err(LcaError::Engine(format!(
                    "tensor '{}' of the PyTorch model answers to two tensors of the spec",
                    t.name
                )));
            }
            used[i] = true;
            map.push((t.offset, t.numel));
        }
        if let Some(i) = used.iter().position(|u| !u) {
            let t = &self.hello.tensors[i];
            return Err(LcaError::Engine(format!(
                "the PyTorch model has {} '{}' (shape {:?}), which the spec does not have",
                if t.buffer { "buffer" } else { "parameter" },
                t.name,
                t.shape
            )));
        }
        self.map = map;
        Ok(())
    }

    fn names(&self) -> String {
        self.hello
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One request: θ out, the loss (and the gradient, for `loss_grad`) back.
    fn request(&self, cmd: &str, theta: &[Vec<T>]) -> Result<(f64, Option<Vec<Vec<f64>>>)> {
        let mut w = self.worker.borrow_mut();
        if let Some(d) = &w.dead {
            return Err(LcaError::Engine(d.clone()));
        }
        if theta.len() != self.map.len() {
            return Err(LcaError::Engine(format!(
                "internal: {} tensors given, the layout has {}",
                theta.len(),
                self.map.len()
            )));
        }
        let m = self.hello.numel;
        let size = std::mem::size_of::<T>();
        let mut send = std::mem::take(&mut w.send);
        send.resize(m * size, 0);
        for (t, &(off, n)) in theta.iter().zip(&self.map) {
            let dst = &mut send[off * size..(off + n) * size];
            if size == 4 {
                for (d, v) in dst.chunks_exact_mut(4).zip(t) {
                    d.copy_from_slice(&(v.f64() as f32).to_le_bytes());
                }
            } else {
                for (d, v) in dst.chunks_exact_mut(8).zip(t) {
                    d.copy_from_slice(&v.f64().to_le_bytes());
                }
            }
        }
        w.next_id += 1;
        let id = w.next_id;
        // Test hook: kill the worker before request N+1, as a crash or the OOM killer would.
        if std::env::var("LCA_ENGINE_TEST_KILL_AFTER")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| id > n)
        {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        let header = json!({"cmd": cmd, "id": id, "dtype": if size == 4 { "f32" } else { "f64" }, "numel": m});
        let during = format!("during a {cmd} request (evaluation {id})");
        let sent = match w.stdin.as_mut() {
            Some(s) => protocol::write_message(s, &header, &[&send]),
            None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        };
        w.send = send;
        if sent.is_err() {
            return Err(w.died(&during));
        }
        let ans = w.read(&during)?;
        match ans.get("cmd").and_then(Value::as_str) {
            Some("result") => {}
            Some("error") => return Err(w.reported(&ans, &during)),
            other => {
                return Err(LcaError::Engine(format!(
                    "the PyTorch worker answered {other:?} {during}"
                )));
            }
        }
        if ans.get("id") != Some(&json!(id)) {
            return Err(LcaError::Engine(format!(
                "the PyTorch worker answered request {:?} {during}",
                ans.get("id")
            )));
        }
        let with_grad = cmd == "loss_grad";
        let expect = 8 + if with_grad { 8 * m } else { 0 };
        if w.recv.len() != expect {
            return Err(LcaError::Engine(format!(
                "the PyTorch worker's result has {} payload bytes, expected {expect} {during}",
                w.recv.len()
            )));
        }
        let f = |b: &[u8]| f64::from_le_bytes(b.try_into().expect("8 bytes"));
        let loss = f(&w.recv[..8]);
        let grads = with_grad.then(|| {
            let g = &w.recv[8..];
            self.map
                .iter()
                .map(|&(off, n)| g[off * 8..(off + n) * 8].chunks_exact(8).map(f).collect())
                .collect()
        });
        Ok((loss, grads))
    }
}

impl<T: Real> Engine for TorchEngine<T> {
    type Real = T;
    type Carry = ();

    fn loss_and_grad(&self, theta: &[Vec<T>]) -> Result<LossGrad> {
        let (loss, grads) = self.request("loss_grad", theta)?;
        Ok(LossGrad {
            loss,
            grads: grads.unwrap_or_default(),
        })
    }

    fn loss(&self, theta: &[Vec<T>]) -> Result<f64> {
        Ok(self.request("loss", theta)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Map<String, Value> {
        json!({"cmd": "hello", "numel": 7, "chunk_size": 4, "n_samples": 9, "precision": "f32",
               "torch": "2.5", "device": "cpu", "loss": "cross_entropy", "batch_norm": null,
               "tensors": [
                 {"name": "fc.weight", "shape": [2, 3], "kind": "parameter", "offset": 0},
                 {"name": "fc.bias", "shape": [1], "kind": "parameter", "offset": 6}],
               "aliases": {"head.weight": "fc.weight"}})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn hello_gives_groups_roles_and_aliases() {
        let h = Hello::parse(hello()).unwrap();
        let p = h.params();
        assert_eq!(p[0].layer, "fc");
        assert_eq!(p[0].role, "weight");
        assert_eq!(p[0].aliases, vec!["head.weight".to_string()]);
        assert_eq!(p[1].shape, vec![1]);
        assert!(p[1].aliases.is_empty());
    }

    #[test]
    fn a_hello_with_gaps_is_refused() {
        let mut h = hello();
        h["numel"] = json!(8);
        let e = Hello::parse(h).unwrap_err().to_string();
        assert!(e.contains("hold 7 values"), "{e}");
    }
}
