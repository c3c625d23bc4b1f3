//! The docs tell the truth about the build, and stay inside the repository.
//!
//! - The README's "Status" table of providers matches the build: every
//!   provider it marks *built* is a cargo feature (in `default` exactly when
//!   the table says so) and a subcommand of the binary built with that
//!   feature; every provider it marks *not yet* is neither; every cargo
//!   feature that is a subcommand of this build has a row.
//! - Every `--flag` the README names for podvisor is a flag of `podvisor`
//!   or of one of its subcommands (`podvisor <sub> --help`); flags written
//!   in a `cargo …` command are cargo's (after `cargo run … --`, podvisor's
//!   again), and flags written after another command (`curl`, `apt-get`, …)
//!   are that command's.
//! - Every subcommand the README's commands give podvisor (`podvisor …
//!   <sub>`, `target/release/podvisor … <sub> <nested>`, `cargo run -- …
//!   <sub>`) is one that `podvisor --help` (or `podvisor <sub> --help`)
//!   lists.
//! - No Markdown link in any `*.md` of the repository points outside it: a
//!   relative link resolves to an existing file under the repository root,
//!   an absolute link is `http(s)` to a public host (or `mailto:`), and no
//!   Markdown file mentions a `../` path that climbs out of the repository.
//!
//! It runs the real binary (`CARGO_BIN_EXE_podvisor`): a provider behind a
//! cargo feature is checked only in a build with that feature, which CI's
//! `--all-features` is (under `CI=true` a provider left unchecked fails).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

#[path = "common/cli.rs"]
mod cli;

/// The repository root (the workspace's root package).
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file of the repository, by its path from the root.
fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Whether the cargo feature `feature` of this package is on in this build
/// (the test binary is built with the package's features); `None` for a
/// feature this test does not know.
fn feature_enabled(feature: &str) -> Option<bool> {
    Some(match feature {
        "local" => cfg!(feature = "local"),
        "aws" => cfg!(feature = "aws"),
        "libvirt" => cfg!(feature = "libvirt"),
        "azure" => cfg!(feature = "azure"),
        "ibmcloud" => cfg!(feature = "ibmcloud"),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// The binary's help
// ---------------------------------------------------------------------------

/// What one `podvisor [subcommands…] --help` shows.
#[derive(Debug, Default)]
struct Help {
    /// The subcommands it lists (without clap's `help`).
    subcommands: BTreeSet<String>,
    /// Its long flags (without the dashes), and whether each takes a value.
    flags: BTreeMap<String, bool>,
}

/// The help of the whole command: every level of subcommands.
#[derive(Debug)]
struct Cli {
    /// Subcommand path (empty: `podvisor` itself) → its help.
    levels: BTreeMap<Vec<String>, Help>,
}

impl Cli {
    fn top(&self) -> &Help {
        &self.levels[&Vec::new()]
    }

    /// Every long flag of the command or of any of its subcommands.
    fn all_flags(&self) -> BTreeSet<&str> {
        self.levels
            .values()
            .flat_map(|h| h.flags.keys().map(String::as_str))
            .collect()
    }
}

/// Runs `podvisor <path…> --help` and reads it.
fn help_of(path: &[String]) -> Help {
    let mut cmd = cli::podvisor_without(&["NODE_NAME", "CLOUD_PROVIDER"], &["LOCAL_", "AWS_"]);
    cmd.args(path).arg("--help");
    let (code, out, err) = cli::run(&mut cmd);
    assert_eq!(
        code,
        0,
        "podvisor {} --help failed:\n{out}\n{err}",
        path.join(" ")
    );
    parse_help(&out)
}

/// Reads clap's long help: a subcommand is a line indented by exactly two
/// spaces that starts with a lowercase letter (`  local    Pod VMs …`); a
/// flag is a definition line (`      --socket <PATH>`, `  -h, --help`).
fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let body = line.trim_start();
        if indent == 2 && body.starts_with(|c: char| c.is_ascii_lowercase()) {
            let name = body.split_whitespace().next().unwrap_or_default();
            if name != "help" {
                help.subcommands.insert(name.to_owned());
            }
        } else if indent <= 6 && body.starts_with('-') {
            let mut tokens = body.split_whitespace().peekable();
            while let Some(token) = tokens.next() {
                let token = token.trim_end_matches(',');
                if !token.starts_with('-') {
                    break;
                }
                if let Some(long) = token.strip_prefix("--") {
                    let name = long.split('=').next().unwrap_or_default().to_owned();
                    let takes_value = tokens
                        .peek()
                        .is_some_and(|next| next.starts_with('<') || next.starts_with("[<"));
                    help.flags.insert(name, takes_value);
                }
            }
        }
    }
    help
}

/// The help of every level of the command, read once.
fn podvisor_cli() -> &'static Cli {
    static CLI: OnceLock<Cli> = OnceLock::new();
    CLI.get_or_init(|| {
        let mut levels = BTreeMap::new();
        let mut todo = vec![Vec::<String>::new()];
        while let Some(path) = todo.pop() {
            let help = help_of(&path);
            // Three levels are all the command has (`journal adopt`).
            if path.len() < 3 {
                for sub in &help.subcommands {
                    let mut next = path.clone();
                    next.push(sub.clone());
                    todo.push(next);
                }
            }
            levels.insert(path, help);
        }
        Cli { levels }
    })
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

/// A piece of a Markdown file: a line of a fenced code block (continued
/// lines joined), an inline code span, or a paragraph of prose (code spans
/// cut out), with the line it starts on.
#[derive(Debug)]
struct Segment {
    line: usize,
    text: String,
    code: bool,
}

/// Splits Markdown into [`Segment`]s: fenced code lines one by one (their
/// `# comments` become prose), and each paragraph of prose — where a code
/// span may run over a line break — as its code spans and the rest.
fn segments(markdown: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    let mut pending: Option<(usize, String)> = None;
    let mut paragraph: Option<(usize, String)> = None;
    let flush = |paragraph: &mut Option<(usize, String)>, out: &mut Vec<Segment>| {
        let Some((line, text)) = paragraph.take() else {
            return;
        };
        let (spans, prose) = code_spans(&text);
        for span in spans {
            out.push(Segment {
                line,
                text: span.replace('\n', " "),
                code: true,
            });
        }
        out.push(Segment {
            line,
            text: prose,
            code: false,
        });
    };
    for (i, line) in markdown.lines().enumerate() {
        let number = i + 1;
        let trimmed = line.trim_start();
        if let Some(marker) = fence {
            if trimmed.starts_with(marker) {
                fence = None;
                continue;
            }
            let (start, mut joined) = pending.take().unwrap_or((number, String::new()));
            joined.push_str(line);
            if let Some(head) = joined.strip_suffix('\\') {
                pending = Some((start, format!("{head} ")));
                continue;
            }
            let (code, comment) = split_comment(&joined);
            out.push(Segment {
                line: start,
                text: code.to_owned(),
                code: true,
            });
            if let Some(comment) = comment {
                out.push(Segment {
                    line: start,
                    text: comment.to_owned(),
                    code: false,
                });
            }
            continue;
        }
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            flush(&mut paragraph, &mut out);
            fence = Some(&trimmed[..3]);
            continue;
        }
        if trimmed.is_empty() {
            flush(&mut paragraph, &mut out);
            continue;
        }
        match &mut paragraph {
            Some((_, text)) => {
                text.push('\n');
                text.push_str(line);
            }
            None => paragraph = Some((number, line.to_owned())),
        }
    }
    flush(&mut paragraph, &mut out);
    out
}

/// A shell line and its `# comment` (a `#` that starts a word).
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return (&line[..i], Some(&line[i..]));
        }
    }
    (line, None)
}

/// The inline code spans of a paragraph, and the paragraph without them.
fn code_spans(line: &str) -> (Vec<String>, String) {
    let mut spans = Vec::new();
    let mut prose = String::new();
    let mut rest = line;
    while let Some(open) = rest.find('`') {
        let ticks = rest[open..].len() - rest[open..].trim_start_matches('`').len();
        let marker = &rest[open..open + ticks];
        let after = &rest[open + ticks..];
        let Some(close) = after.find(marker) else {
            break;
        };
        prose.push_str(&rest[..open]);
        prose.push(' ');
        spans.push(after[..close].trim().to_owned());
        rest = &after[close + ticks..];
    }
    prose.push_str(rest);
    (spans, prose)
}

/// Markdown with its fenced code blocks and inline code spans removed (a
/// link written in code is not a link).
fn without_code(markdown: &str) -> String {
    segments(markdown)
        .into_iter()
        .filter(|s| !s.code)
        .map(|s| s.text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The long flag a word names (`--state-dir`, from `` (`--state-dir=x` ``),
/// if any.
fn long_flag(word: &str) -> Option<String> {
    let word = word.trim_start_matches(['(', '[', '"', '\'', '`', '<']);
    let name = word.strip_prefix("--")?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return None;
    }
    let name: String = name
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect();
    Some(name.trim_end_matches('-').to_owned())
}

/// Who a flag in a code segment belongs to.
#[derive(Debug, Clone, PartialEq)]
enum Owner {
    /// Nothing seen yet: a span that is only a flag (`` `--provider-rate` ``).
    Nobody,
    /// `podvisor` (or `cargo run … --`): the words that follow are its
    /// arguments.
    Podvisor,
    /// `cargo <sub>` before its `--`.
    Cargo(Option<String>),
    /// Another program, or cargo after the `--` of anything but `run`.
    Other,
}

/// Whether `word` runs podvisor: `podvisor`, or a path ending in it.
fn is_podvisor(word: &str) -> bool {
    word == "podvisor" || word.ends_with("/podvisor")
}

/// Whether the word at `i` is in command position: first, or after a
/// separator, a prefix command (`sudo`, `env`, …) or a variable assignment.
fn in_command_position(words: &[&str], i: usize) -> bool {
    let Some(before) = i.checked_sub(1).map(|j| words[j]) else {
        return true;
    };
    let assignment = before.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    });
    assignment
        || [
            "|", "||", "&&", ";", "$", "(", "sudo", "env", "exec", "time",
        ]
        .contains(&before)
        || before.ends_with(['|', ';'])
}

/// The podvisor command lines of a code segment: the words after
/// `podvisor` (or after `cargo run … --`), up to the next separator.
fn podvisor_invocations(code: &str) -> Vec<Vec<String>> {
    let words: Vec<&str> = code.split_whitespace().collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut owner = Owner::Nobody;
    for (i, &word) in words.iter().enumerate() {
        if ["|", "||", "&&", ";"].contains(&word) {
            owner = Owner::Other;
            continue;
        }
        if in_command_position(&words, i) && !word.contains('=') && word != "$" {
            owner = match word {
                w if is_podvisor(w) => {
                    out.push(Vec::new());
                    Owner::Podvisor
                }
                "cargo" => Owner::Cargo(None),
                "sudo" | "env" | "exec" | "time" | "(" => owner,
                _ => Owner::Other,
            };
            continue;
        }
        match &owner {
            Owner::Cargo(sub) if word == "--" => {
                owner = if sub.as_deref() == Some("run") {
                    out.push(Vec::new());
                    Owner::Podvisor
                } else {
                    Owner::Other
                };
            }
            Owner::Cargo(None) if !word.starts_with('-') => {
                owner = Owner::Cargo(Some(word.to_owned()));
            }
            Owner::Podvisor => {
                if let Some(args) = out.last_mut() {
                    args.push(word.to_owned());
                }
            }
            _ => {}
        }
    }
    out
}

/// The long flags a code segment names for podvisor: in a podvisor command
/// line, or in a span that is not a command at all.
fn podvisor_flags_in_code(code: &str) -> Vec<String> {
    let words: Vec<&str> = code.split_whitespace().collect();
    let first_is_flag = words.first().is_some_and(|w| long_flag(w).is_some());
    let mut flags: Vec<String> = podvisor_invocations(code)
        .iter()
        .flatten()
        .filter_map(|w| long_flag(w))
        .collect();
    if first_is_flag {
        // `--provider-rate`, or `--features libvirt` outside a cargo command
        // (which is then held to be podvisor's, and fails): every flag up to
        // the first command word.
        flags.extend(
            words
                .iter()
                .enumerate()
                .take_while(|&(i, w)| {
                    i == 0 || !in_command_position(&words, i) || long_flag(w).is_some()
                })
                .filter_map(|(_, w)| long_flag(w)),
        );
    }
    flags
}

// ---------------------------------------------------------------------------
// (a) The status table
// ---------------------------------------------------------------------------

/// A row of the README's provider status table.
#[derive(Debug)]
struct ProviderRow {
    name: String,
    built: bool,
    /// The "in the build" cell: `default…`, or the cargo command that
    /// builds it.
    build: String,
}

/// The provider table of the README's `## Status` section: the table whose
/// first header cell is `provider`.
fn provider_rows(readme: &str) -> Vec<ProviderRow> {
    let section: Vec<&str> = readme
        .lines()
        .skip_while(|l| l.trim() != "## Status")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect();
    assert!(
        !section.is_empty(),
        "README.md has no `## Status` section (the docs test reads its provider table)"
    );
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let start = section
        .iter()
        .position(|l| {
            l.trim_start().starts_with('|')
                && cells(l)
                    .first()
                    .is_some_and(|c| c.eq_ignore_ascii_case("provider"))
        })
        .expect("README.md's Status section has a table whose first column is `provider`");
    let mut rows = Vec::new();
    for line in section[start + 2..]
        .iter()
        .take_while(|l| l.trim_start().starts_with('|'))
    {
        let c = cells(line);
        assert!(c.len() >= 3, "a provider row needs 3 cells: {line}");
        let name = c[0]
            .split('`')
            .nth(1)
            .unwrap_or_else(|| panic!("the provider's name in backticks: {line}"))
            .to_owned();
        let status = c[1].to_ascii_lowercase();
        let built = if status.starts_with("built") {
            true
        } else if status.starts_with("not yet") {
            false
        } else {
            panic!("a provider's status is `built` or `not yet`: {line}")
        };
        rows.push(ProviderRow {
            name,
            built,
            build: c[2].clone(),
        });
    }
    assert!(!rows.is_empty(), "the provider table has no rows");
    rows
}

/// The cargo features of the daemon's `Cargo.toml`, and its `default`.
fn cargo_features() -> (BTreeSet<String>, BTreeSet<String>) {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml parses");
    let features = manifest["features"]
        .as_table()
        .expect("Cargo.toml has [features]");
    let default = features
        .get("default")
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(toml::Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    (features.keys().cloned().collect(), default)
}

#[test]
fn the_readme_status_table_lists_exactly_the_providers_of_the_build() {
    let rows = provider_rows(&read("README.md"));
    let (features, default) = cargo_features();
    let subcommands = &podvisor_cli().top().subcommands;
    let mut unchecked = Vec::new();
    for row in &rows {
        let name = &row.name;
        if !row.built {
            assert!(
                !subcommands.contains(name),
                "README.md says provider `{name}` is not yet built, but `podvisor --help` lists it: \
                 mark it built in the Status table"
            );
            assert!(
                !features.contains(name),
                "README.md says provider `{name}` is not yet built, but Cargo.toml has a feature \
                 `{name}`: mark it built in the Status table"
            );
            continue;
        }
        assert!(
            features.contains(name),
            "README.md says provider `{name}` is built, but Cargo.toml has no feature `{name}`"
        );
        let readme_default = row.build.starts_with("default");
        assert_eq!(
            readme_default,
            default.contains(name),
            "README.md's Status table and Cargo.toml's `default` disagree on `{name}`: {}",
            row.build
        );
        if !readme_default {
            assert!(
                row.build.contains(&format!("--features {name}")),
                "README.md's Status table must name the build with `{name}` \
                 (`cargo build --features {name}`): {}",
                row.build
            );
        }
        match feature_enabled(name) {
            Some(true) => assert!(
                subcommands.contains(name),
                "README.md says provider `{name}` is built, but `podvisor --help` of a build with \
                 feature `{name}` does not list it: {subcommands:?}"
            ),
            Some(false) => unchecked.push(name.clone()),
            None => panic!(
                "tests/docs.rs does not know the cargo feature `{name}`: add it to feature_enabled"
            ),
        }
    }
    // Every provider of this build has a row.
    let listed: BTreeSet<&String> = rows.iter().map(|r| &r.name).collect();
    for feature in &features {
        if subcommands.contains(feature) {
            assert!(
                listed.contains(feature),
                "`podvisor {feature}` is a provider of this build (cargo feature `{feature}`) \
                 but README.md's Status table has no row for it"
            );
        }
    }
    if !unchecked.is_empty() {
        let message = format!(
            "not in this build, so not checked as subcommands: {unchecked:?} \
             (cargo test --all-features checks them)"
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "under CI=true every provider is checked: {message}"
        );
        eprintln!("SKIPPED part of docs: {message}");
    }
}

// ---------------------------------------------------------------------------
// (b) Flags and subcommands in the README
// ---------------------------------------------------------------------------

#[test]
fn every_flag_the_readme_names_is_a_flag_of_podvisor() {
    let readme = read("README.md");
    let known = podvisor_cli().all_flags();
    let mut named = BTreeMap::<String, usize>::new();
    for segment in segments(&readme) {
        let flags = if segment.code {
            podvisor_flags_in_code(&segment.text)
        } else {
            segment
                .text
                .split_whitespace()
                .filter_map(long_flag)
                .collect()
        };
        for flag in flags {
            named.entry(flag).or_insert(segment.line);
        }
    }
    assert!(
        named.len() >= 5,
        "the README names podvisor's flags; found only {named:?}"
    );
    eprintln!(
        "README flags checked: {:?}",
        named.keys().collect::<Vec<_>>()
    );
    let missing: Vec<String> = named
        .iter()
        .filter(|(flag, _)| !known.contains(flag.as_str()))
        .map(|(flag, line)| format!("--{flag} (README.md:{line})"))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md names flags that neither `podvisor --help` nor any `podvisor <subcommand> \
         --help` of this build has: {missing:?}\n(a cargo flag belongs in a `cargo …` command)"
    );
}

/// The subcommand path of one podvisor command line: its first word that is
/// not a flag or a flag's value, then the same within that subcommand while
/// it has subcommands. Stops at a placeholder (`<provider>`, `[flags]`).
fn subcommand_path(args: &[String], cli: &Cli) -> Vec<String> {
    let mut path = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let Some(level) = cli.levels.get(&path) else {
            break;
        };
        if let Some(flag) = long_flag(word) {
            if level.flags.get(&flag).copied().unwrap_or(false) && !word.contains('=') {
                words.next();
            }
            continue;
        }
        if word.starts_with('-') {
            continue;
        }
        if !word.starts_with(|c: char| c.is_ascii_lowercase()) || level.subcommands.is_empty() {
            break;
        }
        path.push(word.clone());
    }
    path
}

#[test]
fn every_subcommand_the_readme_runs_is_a_subcommand_of_podvisor() {
    let readme = read("README.md");
    let cli = podvisor_cli();
    let mut checked = BTreeSet::new();
    let mut missing = Vec::new();
    for segment in segments(&readme).iter().filter(|s| s.code) {
        for args in podvisor_invocations(&segment.text) {
            let path = subcommand_path(&args, cli);
            let mut level: Vec<String> = Vec::new();
            for sub in &path {
                let known = cli
                    .levels
                    .get(&level)
                    .is_some_and(|h| h.subcommands.contains(sub));
                level.push(sub.clone());
                if known {
                    checked.insert(level.join(" "));
                } else {
                    missing.push(format!(
                        "podvisor {} (README.md:{})",
                        level.join(" "),
                        segment.line
                    ));
                    break;
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README.md runs subcommands that `podvisor --help` of this build does not list: {missing:?}"
    );
    assert!(
        checked.contains("local"),
        "the README's quick start runs `podvisor … local`; found only {checked:?}"
    );
    eprintln!("README subcommands checked: {checked:?}");
}

// ---------------------------------------------------------------------------
// (c) Links stay in the repository
// ---------------------------------------------------------------------------

/// Every `*.md` under the repository root, outside `target/` and `.git/`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![root().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.expect("a directory entry");
            let path = entry.path();
            let file_type = entry.file_type().expect("a file type");
            let name = entry.file_name();
            if file_type.is_dir() {
                if name != "target" && name != ".git" {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The destinations of a Markdown text's links (code already removed):
/// inline `[text](dest)` and `![alt](dest)`, reference definitions
/// `[label]: dest`, autolinks `<scheme:…>`, and HTML `href="…"`/`src="…"`.
fn link_destinations(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let mut depth = 0usize;
        let end = after
            .char_indices()
            .find(|&(_, c)| match c {
                '(' => {
                    depth += 1;
                    false
                }
                ')' if depth == 0 => true,
                ')' => {
                    depth -= 1;
                    false
                }
                _ => false,
            })
            .map_or(after.len(), |(i, _)| i);
        let inner = after[..end].trim();
        let dest = match inner.strip_prefix('<') {
            Some(angled) => angled.split('>').next().unwrap_or_default(),
            None => inner.split_whitespace().next().unwrap_or_default(),
        };
        out.push(dest.to_owned());
        rest = &after[end.min(after.len())..];
    }
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('[')
            && let Some((_, dest)) = line.split_once("]:")
        {
            let dest = dest.split_whitespace().next().unwrap_or_default();
            out.push(dest.trim_matches(['<', '>']).to_owned());
        }
    }
    let mut rest = text;
    while let Some(at) = rest.find('<') {
        let after = &rest[at + 1..];
        let end = after.find('>').unwrap_or(after.len());
        let inner = &after[..end];
        if let Some((scheme, _)) = inner.split_once(':')
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
            && !inner.contains(char::is_whitespace)
        {
            out.push(inner.to_owned());
        }
        rest = after;
    }
    for attribute in ["href=\"", "src=\"", "href='", "src='"] {
        let quote = attribute.chars().last().unwrap_or('"');
        let mut rest = text;
        while let Some(at) = rest.find(attribute) {
            let after = &rest[at + attribute.len()..];
            let end = after.find(quote).unwrap_or(after.len());
            out.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    out
}

/// Whether `host` (of an `http(s)` link) is a public site: a dotted name
/// that is not loopback, private, link-local or a local-only domain.
fn public_host(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if host.is_empty() || host.starts_with('[') || !host.contains('.') {
        return false;
    }
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return !(ip.is_loopback()
            || ip.is_private()
            || ip.is_link_local()
            || ip.is_unspecified()
            || ip.is_broadcast());
    }
    ![
        ".local",
        ".localhost",
        ".internal",
        ".lan",
        ".home",
        ".corp",
    ]
    .iter()
    .any(|suffix| host.ends_with(suffix))
}

/// `path` with `.` and `..` resolved lexically; `None` if it climbs above
/// `root`.
fn inside(root: &Path, path: &Path) -> Option<PathBuf> {
    let relative = path.strip_prefix(root).ok()?;
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(
        parts
            .iter()
            .fold(root.to_path_buf(), |p, part| p.join(part)),
    )
}

/// Why a link from `file` to `dest` points outside the repository, if it
/// does.
fn outside(file: &Path, dest: &str) -> Option<String> {
    let dest = dest.trim();
    if dest.is_empty() || dest.starts_with('#') {
        return None;
    }
    let scheme = dest
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| !s.contains('/') && !s.is_empty());
    if let Some(scheme) = scheme {
        return match scheme.as_str() {
            "http" | "https" => {
                let host = dest
                    .split_once("//")
                    .map(|(_, h)| h)
                    .unwrap_or_default()
                    .split(['/', '?', '#'])
                    .next()
                    .unwrap_or_default();
                let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
                let host = host.split(':').next().unwrap_or_default();
                (!public_host(host)).then(|| format!("{dest}: not a public site"))
            }
            "mailto" => None,
            _ => Some(format!(
                "{dest}: a `{scheme}:` link is not in the repository"
            )),
        };
    }
    if dest.starts_with('/') {
        return Some(format!(
            "{dest}: an absolute path, not a file of the repository"
        ));
    }
    let path = dest.split(['#', '?']).next().unwrap_or_default();
    let path = path.replace("%20", " ");
    let base = file.parent().unwrap_or(root());
    let Some(target) = inside(root(), &base.join(&path)) else {
        return Some(format!("{dest}: climbs out of the repository"));
    };
    let Ok(real) = target.canonicalize() else {
        return Some(format!("{dest}: no such file in the repository"));
    };
    let real_root = root().canonicalize().expect("the repository root");
    (!real.starts_with(&real_root)).then(|| format!("{dest}: leads out of the repository"))
}

#[test]
fn no_markdown_link_points_outside_the_repository() {
    let files = markdown_files();
    assert!(
        files.iter().any(|f| f.ends_with("README.md")),
        "the walk finds README.md: {files:?}"
    );
    let mut bad = Vec::new();
    let mut links = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a Markdown file");
        let name = file.strip_prefix(root()).unwrap_or(file).display();
        for dest in link_destinations(&without_code(&text)) {
            links += 1;
            if let Some(why) = outside(file, &dest) {
                bad.push(format!("{name}: link {why}"));
            }
        }
        // A mention of a path outside, even as code (`../elsewhere/…`).
        let base = file.parent().unwrap_or(root());
        for word in text.split_whitespace() {
            let word = word.trim_start_matches(['(', '[', '"', '\'', '`', '<']);
            if word.starts_with("../") && inside(root(), &base.join(word)).is_none() {
                bad.push(format!("{name}: mentions {word}, outside the repository"));
            }
        }
    }
    assert!(links > 0, "no link found in {} Markdown files", files.len());
    assert!(
        bad.is_empty(),
        "Markdown that points outside the repository (a clone has only the repository):\n{}",
        bad.join("\n")
    );
}

// ---------------------------------------------------------------------------
// The checks' own parsing
// ---------------------------------------------------------------------------

#[test]
fn the_checks_read_commands_as_a_shell_would() {
    let line = "cargo run --release -- --state-dir s --socket x.sock local";
    assert_eq!(
        podvisor_invocations(line),
        [["--state-dir", "s", "--socket", "x.sock", "local"]]
    );
    assert_eq!(podvisor_flags_in_code(line), ["state-dir", "socket"]);
    assert!(podvisor_flags_in_code("cargo build --release --features libvirt").is_empty());
    assert!(podvisor_flags_in_code("cargo clippy --all-targets -- -D warnings").is_empty());
    assert!(podvisor_flags_in_code("curl -s --max-time 3 x | jq").is_empty());
    assert_eq!(podvisor_flags_in_code("--features libvirt"), ["features"]);
    assert_eq!(
        podvisor_invocations("PODVM_AMI_ID=ami-1 target/release/podvisor --node-name \"$N\" aws"),
        [["--node-name", "\"$N\"", "aws"]]
    );
    let links =
        link_destinations("[a](../x.md) [b](https://example.org/a_(b)) <https://c.io>\n[d]: e.md");
    assert_eq!(
        links,
        [
            "../x.md",
            "https://example.org/a_(b)",
            "e.md",
            "https://c.io"
        ]
    );
    let readme = root().join("README.md");
    assert!(outside(&readme, "../elsewhere/STYLE.md").is_some());
    assert!(outside(&readme, "docs/operations.md#logs").is_none());
    assert!(outside(&readme, "docs/nothing.md").is_some());
    assert!(outside(&readme, "file:///etc/passwd").is_some());
    assert!(outside(&readme, "http://127.0.0.1:9797/metrics").is_some());
    assert!(outside(&readme, "https://github.com/").is_none());
    assert!(outside(&root().join("docs/x.md"), "../README.md").is_none());
}
