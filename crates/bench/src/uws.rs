//! The uWebSockets peer (`--peer uws`): a Python environment with socketify
//! in it, made once under the build's target directory, and the relay
//! script that runs there (`peers/uws_relay.py`, built into this binary).
//!
//! It owns only that preparation: finding or making the environment,
//! installing socketify from the package index with pip, and writing the
//! script next to it. Starting and measuring the relay is [`procs`]'s work,
//! like any other server. Nothing here runs unless `--peer uws` was given,
//! so the rest of the bench (and its CI smoke run) never needs Python.
//!
//! [`procs`]: super::procs

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Command;

/// The relay, written into the environment at every run so that it always
/// matches this binary.
const SCRIPT: &str = include_str!("../peers/uws_relay.py");
/// The socketify release the relay was written against.
pub const SOCKETIFY: &str = "socketify==0.0.31";
/// The shared library socketify's uWS build loads at import.
const LIBUV: &str = "libuv.so.1";
/// How long making the environment or installing socketify may take.
const SETUP_LIMIT: Duration = Duration::from_secs(300);
/// How long a quick check (an import, `ldconfig -p`) may take.
const CHECK_LIMIT: Duration = Duration::from_secs(30);

/// A prepared environment: its interpreter and the relay script.
#[derive(Debug, Clone)]
pub struct UwsPeer {
    pub python: PathBuf,
    pub script: PathBuf,
}

/// The build's target directory: `CARGO_TARGET_DIR` if set, else the
/// directory above the `release` or `debug` folder this binary runs from,
/// else a folder under the system's temporary directory.
fn target_dir(exe: &Path, cargo_target_dir: Option<&OsStr>) -> PathBuf {
    if let Some(dir) = cargo_target_dir.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let profile = exe.parent();
    let is_profile = profile
        .and_then(Path::file_name)
        .is_some_and(|n| n == "release" || n == "debug");
    match profile.and_then(Path::parent) {
        Some(target) if is_profile => target.to_path_buf(),
        _ => std::env::temp_dir().join("guildchat-bench"),
    }
}

/// Where the environment lives for the binary at `exe`.
pub fn venv_dir(exe: &Path) -> PathBuf {
    target_dir(exe, std::env::var_os("CARGO_TARGET_DIR").as_deref()).join("venv-uws")
}

/// Runs a command to completion within `limit`; its stderr on failure.
async fn run(program: &Path, args: &[&OsStr], limit: Duration) -> anyhow::Result<()> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("{} took longer than {limit:?}", program.display()))??;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} failed ({}):\n{}",
            program.display(),
            out.status,
            tail.join("\n")
        );
    }
    Ok(())
}

/// Whether the dynamic linker knows libuv.
async fn libuv_present() -> bool {
    let listing = Command::new("ldconfig")
        .arg("-p")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CHECK_LIMIT, listing).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).contains(LIBUV),
        // No ldconfig to ask: look where Debian puts it.
        _ => [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib",
        ]
        .iter()
        .any(|d| Path::new(d).join(LIBUV).exists()),
    }
}

async fn socketify_imports(python: &Path) -> bool {
    python.exists()
        && run(
            python,
            &[OsStr::new("-c"), OsStr::new("import socketify")],
            CHECK_LIMIT,
        )
        .await
        .is_ok()
}

/// Makes the environment under the target directory if it is missing,
/// installs socketify into it if it cannot be imported, and writes the
/// relay script. Fails with what to install when libuv is missing.
pub async fn prepare(exe: &Path) -> anyhow::Result<UwsPeer> {
    if !libuv_present().await {
        bail!(
            "--peer uws: socketify needs {LIBUV}, which is not installed; \
             install Debian's libuv1 (`apt-get install -y libuv1`), or run \
             `scripts/bench --peer uws`, which does"
        );
    }
    let venv = venv_dir(exe);
    let python = venv.join("bin").join("python");
    if !python.exists() {
        run(
            Path::new("python3"),
            &[OsStr::new("-m"), OsStr::new("venv"), venv.as_os_str()],
            SETUP_LIMIT,
        )
        .await
        .with_context(|| format!("--peer uws: making a Python venv in {}", venv.display()))?;
    }
    if !socketify_imports(&python).await {
        run(
            &python,
            &[
                OsStr::new("-m"),
                OsStr::new("pip"),
                OsStr::new("install"),
                OsStr::new("--quiet"),
                OsStr::new("--disable-pip-version-check"),
                OsStr::new(SOCKETIFY),
            ],
            SETUP_LIMIT,
        )
        .await
        .with_context(|| format!("--peer uws: installing {SOCKETIFY} with pip"))?;
        if !socketify_imports(&python).await {
            bail!(
                "--peer uws: {SOCKETIFY} was installed in {} but does not import",
                venv.display()
            );
        }
    }
    let script = venv.join("uws_relay.py");
    std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    Ok(UwsPeer { python, script })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_prefers_the_variable_then_the_profile_folder() {
        let exe = Path::new("/build/target/release/guildchat");
        assert_eq!(
            target_dir(exe, Some(OsStr::new("/cache/t"))),
            PathBuf::from("/cache/t")
        );
        assert_eq!(
            target_dir(exe, Some(OsStr::new(""))),
            PathBuf::from("/build/target")
        );
        assert_eq!(
            target_dir(Path::new("/x/target/debug/guildchat"), None),
            PathBuf::from("/x/target")
        );
        assert_eq!(
            target_dir(Path::new("/usr/bin/guildchat"), None),
            std::env::temp_dir().join("guildchat-bench")
        );
    }

    #[test]
    fn the_relay_fans_out_in_uws_and_includes_the_sender() {
        // One publish per received frame, from the app (which reaches the
        // sender too), to a topic every connection joins when it opens.
        assert!(SCRIPT.contains("ws.subscribe(TOPIC)"));
        assert!(SCRIPT.contains("app.publish(TOPIC, message, OpCode.BINARY)"));
        assert!(SCRIPT.contains("host=\"127.0.0.1\""));
        assert!(SCRIPT.contains("signal.alarm("));
    }
}
