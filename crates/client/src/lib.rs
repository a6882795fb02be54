//! guildchat clients, built on the protocol crate alone.
//!
//! - [`Client`]: one websocket connection speaking the protocol; the
//!   building block of the terminal client, the load generator and the
//!   server's integration tests.
//! - [`chat`]: the interactive terminal client (`guildchat chat`).
//!
//! Nothing here knows the server's internals: if a client here works, a game
//! client generated from `proto/chatproto.proto` works the same way.

#![forbid(unsafe_code)]

pub mod chat;
mod client;

pub use client::{tcp_connect, Client, ClientError, Event};
