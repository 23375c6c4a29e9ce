//! docs/tutorial.md is executable: every command of its ```sh blocks is run, in order, from a
//! scratch directory that stands for the repository root (`fixtures` is a link to the real
//! one), with `lca` resolved to the binary under test. Each must exit with the status written
//! beside it as `# exit status N` (0 when none is written). A ```text block right after a
//! ```sh block shows output: each of its lines must appear in the output of that block's last
//! command. The figures the `lca plot` commands write must exist and be non-empty.
//!
//! The one command not run as written is `cargo install --path .` (it would rebuild and
//! install into the user's home): the binary it would install is the one under test, which is
//! checked to run instead. No other `cargo` command is allowed in the tutorial.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A shell command of the tutorial and the exit status it must have.
#[derive(Debug)]
struct Cmd {
    line: String,
    status: i32,
}

/// A ```sh block and the ```text block that follows it, if any.
#[derive(Debug)]
struct Block {
    cmds: Vec<Cmd>,
    expected_output: Option<Vec<String>>,
}

fn parse(doc: &str) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    let mut lines = doc.lines().peekable();
    // Whether only blank lines separate the current position from the last ```sh block.
    let mut after_sh = false;
    while let Some(l) = lines.next() {
        let fence = l.trim_start();
        if fence == "```sh" {
            let mut cmds = Vec::new();
            let mut pending = String::new();
            for l in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    break;
                }
                let l = l.trim();
                if l.is_empty() || (pending.is_empty() && l.starts_with('#')) {
                    continue;
                }
                if let Some(cont) = l.strip_suffix('\\') {
                    pending.push_str(cont);
                    pending.push(' ');
                    continue;
                }
                pending.push_str(l);
                let (line, status) = match pending.split_once("# exit status ") {
                    Some((cmd, n)) => (
                        cmd.trim().to_string(),
                        n.trim().parse().expect("# exit status N"),
                    ),
                    None => (pending.trim().to_string(), 0),
                };
                cmds.push(Cmd { line, status });
                pending.clear();
            }
            assert!(pending.is_empty(), "unfinished continuation line");
            blocks.push(Block {
                cmds,
                expected_output: None,
            });
            after_sh = true;
        } else if fence == "```text" && after_sh {
            let mut text = Vec::new();
            for l in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    break;
                }
                if !l.trim().is_empty() {
                    text.push(l.trim().to_string());
                }
            }
            blocks.last_mut().expect("sh block").expected_output = Some(text);
            after_sh = false;
        } else if !fence.is_empty() {
            after_sh = false;
            if fence.starts_with("```") {
                // Skip other fenced blocks (python, toml, ...).
                for l in lines.by_ref() {
                    if l.trim_start().starts_with("```") {
                        break;
                    }
                }
            }
        }
    }
    blocks
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn parser_reads_commands_statuses_and_outputs() {
    let doc = "x\n```sh\n# comment\nlca a \\\n  b\nlca c   # exit status 1\n```\n\n```text\nout 1\n\nout 2\n```\n```python\nprint(1)\n```\n";
    let b = parse(doc);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].cmds.len(), 2);
    assert_eq!(b[0].cmds[0].line, "lca a  b");
    assert_eq!(b[0].cmds[0].status, 0);
    assert_eq!(b[0].cmds[1].line, "lca c");
    assert_eq!(b[0].cmds[1].status, 1);
    assert_eq!(
        b[0].expected_output.as_deref(),
        Some(&["out 1".to_string(), "out 2".to_string()][..])
    );
}

#[test]
fn every_tutorial_command_runs_as_documented() {
    let doc = std::fs::read_to_string(repo().join("docs/tutorial.md")).unwrap();
    let blocks = parse(&doc);
    let all: Vec<&Cmd> = blocks.iter().flat_map(|b| &b.cmds).collect();
    assert!(all.len() >= 15, "only {} commands found", all.len());

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    std::os::unix::fs::symlink(repo().join("fixtures"), root.join("fixtures")).unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_lca"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut figures: Vec<PathBuf> = Vec::new();
    for block in &blocks {
        let mut last_output = String::new();
        for c in &block.cmds {
            if c.line.starts_with("cargo ") {
                assert_eq!(
                    c.line, "cargo install --path .",
                    "the tutorial may only use `cargo install --path .`"
                );
                let o = Command::new(&bin).arg("--version").output().unwrap();
                assert!(o.status.success());
                continue;
            }
            let o = Command::new("bash")
                .arg("-c")
                .arg(&c.line)
                .current_dir(root)
                .env("PATH", &path)
                .env_remove("NO_COLOR")
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert_eq!(
                o.status.code(),
                Some(c.status),
                "`{}` exited {:?}, the tutorial says {}\nstdout:\n{out}\nstderr:\n{err}",
                c.line,
                o.status.code(),
                c.status
            );
            assert!(!err.contains("panicked"), "{}: {err}", c.line);
            if c.line.starts_with("lca plot ") {
                let words: Vec<&str> = c.line.split_whitespace().collect();
                let i = words.iter().position(|w| *w == "-o").expect("plot -o FILE");
                figures.push(root.join(words[i + 1]));
            }
            last_output = format!("{out}{err}");
        }
        if let Some(expected) = &block.expected_output {
            for line in expected {
                assert!(
                    last_output.lines().any(|l| l.trim() == line),
                    "the tutorial shows {line:?} after `{}`, which printed:\n{last_output}",
                    block.cmds.last().unwrap().line
                );
            }
        }
    }
    // The five figures.
    assert_eq!(figures.len(), 5, "{figures:?}");
    for f in &figures {
        let len = std::fs::metadata(f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .len();
        assert!(len > 10_000, "{}: {len} bytes", f.display());
    }
    // Completion script and man page.
    for (f, needle) in [("lca.bash", "_lca()"), ("lca.1", ".TH lca 1")] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        assert!(text.contains(needle), "{f}");
    }
    assert!(Path::new(&root.join("lca-out/summary.json")).is_file());
}
