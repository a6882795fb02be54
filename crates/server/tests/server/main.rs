//! Integration tests: the real server on 127.0.0.1:0, real websockets, the
//! real protocol. One test binary (faster to build), one module per area.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod admin;
mod admission;
mod channels;
mod cluster;
mod common;
mod counting;
mod database;
mod history;
mod json;
mod login;
mod promises;
mod rates;
mod resume;
mod robustness;
mod sessions;
mod tls;
