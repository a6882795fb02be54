//! Integration tests: the real server on 127.0.0.1:0, real websockets, the
//! real protocol. One test binary (faster to build), one module per area.

mod admission;
mod channels;
mod cli;
mod common;
mod counting;
mod crash;
mod history;
mod login;
mod promises;
mod rates;
mod resume;
mod robustness;
mod sessions;
mod tls;
