//! Builds the web UI (`web/`, TypeScript with Vite) into `OUT_DIR/web` and lists its files for the gateway to
//! serve, each with its gzipped form. The build runs `npm ci` when `web/node_modules` is missing or older than
//! the lock file, then `npm run build`; it runs again only when the UI's sources or the public protos change.
//!
//! Without Node.js and npm (or when the build fails) the gateway still builds: it serves a page that says the
//! web UI was not built and why, and cargo prints the reason as a warning.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

type BoxError = Box<dyn std::error::Error>;

/// Files and folders of `web/` whose change means a new build; the generated client (`src/gen`), the
/// dependencies and the output are not among them.
const INPUTS: &[&str] = &[
    "package.json",
    "package-lock.json",
    "index.html",
    "vite.config.ts",
    "tsconfig.json",
    "buf.gen.yaml",
    "public",
];

fn main() -> Result<(), BoxError> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../..");
    let web = root.join("web");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("web");
    println!("cargo:rerun-if-env-changed=NSML_WEB_SKIP");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("proto/nsml/v1").display()
    );
    for input in INPUTS {
        println!("cargo:rerun-if-changed={}", web.join(input).display());
    }
    if let Ok(entries) = std::fs::read_dir(web.join("src")) {
        for entry in entries.flatten() {
            if entry.file_name() != "gen" {
                println!("cargo:rerun-if-changed={}", entry.path().display());
            }
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::create_dir_all(&out)?;
    let built = match std::env::var("NSML_WEB_SKIP") {
        Ok(v) if !v.is_empty() => Err(format!(
            "NSML_WEB_SKIP={v} was set when the gateway was built"
        )),
        _ => build(&web, &out),
    };
    if let Err(why) = &built {
        println!("cargo:warning=the web UI was not built: {why}");
        std::fs::remove_dir_all(&out)?;
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("index.html"), not_built(why))?;
    }
    let listing = listing(&out)?;
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR")?).join("web_assets.rs"),
        listing,
    )?;
    Ok(())
}

/// Installs the UI's dependencies when needed and builds it into `out`, one build at a time (builds of other
/// target directories share `web/node_modules` and `web/src/gen`).
fn build(web: &Path, out: &Path) -> Result<(), String> {
    if !web.join("package.json").exists() {
        return Err(format!("{} has no package.json", web.display()));
    }
    let lock = std::fs::File::create(web.join(".build-lock"))
        .map_err(|e| format!("cannot create web/.build-lock: {e}"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("cannot lock web/.build-lock: {e}"))?;
    let installed = web.join("node_modules/.package-lock.json");
    let stale = match (
        modified(&installed),
        modified(&web.join("package-lock.json")),
    ) {
        (Some(have), Some(want)) => have < want,
        _ => true,
    };
    if stale {
        npm(web, &["ci", "--no-audit", "--no-fund"])?;
    }
    let out = out.to_str().ok_or("the build directory is not UTF-8")?;
    npm(
        web,
        &["run", "build", "--", "--outDir", out, "--emptyOutDir"],
    )
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn npm(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run npm ({e}): install Node.js and npm, then build again"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut said = String::from_utf8_lossy(&out.stderr).into_owned();
    said.push_str(&String::from_utf8_lossy(&out.stdout));
    let tail: Vec<&str> = said.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "`npm {}` failed ({}): {}",
        args.join(" "),
        out.status,
        tail.join(" | ")
    ))
}

/// The page served in place of the UI when it could not be built.
fn not_built(why: &str) -> String {
    let escaped = why
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<!doctype html><meta charset=\"utf-8\"><title>NSML</title>\
         <h1>The web UI was not built</h1><p>{escaped}</p>\
         <p>The gateway serves the API on this address as usual; the <code>nsml</code> CLI works.</p>"
    )
}

/// `static WEB_ASSETS`: every file under `out` by its URL path, content type, bytes and gzipped bytes.
fn listing(out: &Path) -> Result<String, BoxError> {
    let mut files = Vec::new();
    walk(out, &mut files)?;
    files.sort();
    let mut code = String::from(
        "/// The web UI's files: URL path, content type, bytes, gzipped bytes.\n\
         pub static WEB_ASSETS: &[(&str, &str, &[u8], &[u8])] = &[\n",
    );
    for file in files {
        let rel = file
            .strip_prefix(out)?
            .to_str()
            .ok_or("a UI file name is not UTF-8")?;
        let url = format!("/{}", rel.replace('\\', "/"));
        let gz = file.with_extension(format!(
            "{}.gz",
            file.extension().and_then(|e| e.to_str()).unwrap_or("")
        ));
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&std::fs::read(&file)?)?;
        std::fs::write(&gz, enc.finish()?)?;
        code.push_str(&format!(
            "    ({url:?}, {ty:?}, include_bytes!({file:?}), include_bytes!({gz:?})),\n",
            ty = content_type(&url),
            file = file.display().to_string(),
            gz = gz.display().to_string(),
        ));
    }
    code.push_str("];\n");
    Ok(code)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), BoxError> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else if path.extension().is_none_or(|e| e != "gz") {
            files.push(path);
        }
    }
    Ok(())
}

fn content_type(url: &str) -> &'static str {
    match url.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "map" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
