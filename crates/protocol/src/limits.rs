//! Sizes every peer must respect. The server enforces them before it
//! allocates; clients should respect them to avoid being disconnected.

/// Largest websocket message the server accepts, in bytes. A login with a
/// large token is the biggest legitimate request (well under 2 KiB); chat
/// text is capped in characters far below this.
pub const MAX_FRAME_BYTES: usize = 4 * 1024;

/// Longest username, in characters.
pub const MAX_NAME_CHARS: usize = 32;

/// Hard upper bound on any channel's configurable text limit, in characters.
pub const MAX_TEXT_CHARS: usize = 1000;

/// Largest CHATMSG value: the msgid must fit a 2-byte varint.
pub const MAX_MSGID: u32 = (1 << 14) - 1;
