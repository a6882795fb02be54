//! Integration tests of the `guildchat` binary itself, as a child process:
//! its tools (keygen, token, config checks), the admin listener driven by
//! `guildchat admin`, SIGHUP reload, and crash recovery after SIGKILL. The in-process server tests live in the server crate; the
//! harness is shared with them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

#[path = "../../../server/tests/server/common.rs"]
#[allow(dead_code)]
mod common;

mod admin;
mod cli;
mod cluster;
mod crash;
