//! The network side: everything that touches a socket.
//!
//! - [`admission`]: connection limits (global, pre-login, per IP), the
//!   per-IP login rate, the PROXY header and the HTTP answer before the
//!   upgrade.
//! - [`listener`]: the accept loop (plain TCP or TLS) and the websocket
//!   upgrade.
//! - [`conn`]: one connection's reader: the login handshake, then decoding
//!   frames and forwarding requests to the user actor.
//! - [`writer`]: one connection's writer: drains its queue, writes a batch,
//!   flushes once.
//! - [`outbound`]: [`ConnTx`], the handle through which logic code queues
//!   frames for a connection or closes it.
//! - [`queue`]: the bounded frame queue under [`ConnTx`], allocated as it
//!   fills.
//!
//! Nothing here owns chat state: the network tasks only move frames, so a
//! connection can be swapped under a user actor (takeover) without the
//! logic noticing.

pub mod admission;
pub mod conn;
pub mod listener;
pub mod outbound;
pub mod queue;
pub mod writer;

pub use outbound::{Close, ConnTx, Control, Outbound, Priority, SendError};
