//! The shape of the source: dependencies point one way, `http`/`cli`/`console` → `app` → `store` /
//! `projections` → `aggregates`. The crates enforce the last steps; this enforces the rest
//! by reading the source files.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The function a line is in: the last item line at column 0 above it that starts a fn.
fn enclosing_fn(lines: &[&str], index: usize) -> Option<String> {
    lines[..=index].iter().rev().find_map(|line| {
        let mut rest = *line;
        for prefix in ["pub ", "async "] {
            rest = rest.strip_prefix(prefix).unwrap_or(rest);
        }
        let name = rest.strip_prefix("fn ")?;
        name.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .next()
            .map(str::to_string)
    })
}

/// Every place in `src/` that imports against the direction of the layers.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let relative = file
            .strip_prefix(src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&file).expect("read source file");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let at = || format!("src/{relative}:{}: {}", i + 1, line.trim());
            let in_http = relative.starts_with("http/") || relative == "http.rs";
            // Only `http` itself, and the command line's `serve` (which wires it up), may
            // reach into `http`.
            if code.contains("crate::http") && !in_http {
                let serve_wiring = (relative == "cli.rs" || relative.starts_with("cli/"))
                    && enclosing_fn(&lines, i).as_deref() == Some("run_serve");
                if !serve_wiring {
                    found.push(format!("{} (imports http)", at()));
                }
            }
            // The console reads and acts only through `app`, as the API does, so the two
            // cannot show different numbers.
            if relative.starts_with("console/") {
                for below in ["crate::cli", "crate::store", "projections::", "sqlx::query"] {
                    if code.contains(below) {
                        found.push(format!("{} (console imports {below})", at()));
                    }
                }
            }
            if relative.starts_with("app/") {
                for outer in ["crate::cli", "crate::console", "crate::http", "axum"] {
                    if code.contains(outer) {
                        found.push(format!("{} (app imports {outer})", at()));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn dependencies_point_one_way_from_transports_to_app_to_the_store() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "imports against the layers (http/cli → app → store/projections → aggregates):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_an_import_against_the_layers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("app")).unwrap();
    std::fs::create_dir_all(dir.path().join("http")).unwrap();
    std::fs::write(
        dir.path().join("app/contacts.rs"),
        "use crate::http::extract::CommandRequest;\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("http/mod.rs"), "use crate::app::App;\n").unwrap();
    std::fs::create_dir_all(dir.path().join("console")).unwrap();
    std::fs::write(
        dir.path().join("console/pages.rs"),
        "use crate::app::reads;\nuse projections::campaigns::page;\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("cli.rs"),
        "fn run_serve() {\n    crate::http::router(app);\n}\nfn other() {\n    crate::http::router(app);\n}\n",
    )
    .unwrap();
    let found = violations(dir.path());
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(found[0].starts_with("src/app/contacts.rs:1"), "{found:#?}");
    assert!(found[2].starts_with("src/cli.rs:5"), "{found:#?}");
    assert!(found[3].starts_with("src/console/pages.rs:2"), "{found:#?}");
}
