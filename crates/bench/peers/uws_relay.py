"""The uWebSockets relay (`guildchat bench --peer uws`): the reference
relay's protocol served by uWebSockets through socketify, to show what a
websocket server written in C++ does with the same traffic on this machine.

It behaves like the reference relay (crates/bench/src/reference.rs): every
binary frame a client sends is relayed unchanged to every connection, the
sender included; text frames are ignored; pings are answered by uWS itself
with a pong carrying the same payload. There is no login and no protocol.
The fan-out is one publish to a topic every connection subscribed to when it
opened, so uWS's C++ core copies the frame to the sockets; Python runs once
per frame received, never once per recipient. A connection whose unsent
bytes pass MAX_BACKPRESSURE has further frames dropped (the reference drops
what does not fit its 1024-frame queue); the generator counts them as loss.

It listens on 127.0.0.1 only, and exits after --limit-secs whatever happens
(SIGALRM's default action ends the process even while the loop is inside
uWS). SIGTERM's default action ends it too.

It must never be used as a chat server: it trusts every client and relays
anything.
"""

import argparse
import signal
import sys

from socketify import App, AppListenOptions, OpCode

# Every connection subscribes to this one topic.
TOPIC = "all"
# Unsent bytes one connection may hold before frames to it are dropped: the
# reference's websocket write buffer limit.
MAX_BACKPRESSURE = 1024 * 1024
# The reference's (and guildchat's) largest accepted message.
MAX_PAYLOAD = 4 * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--limit-secs", type=int, default=3600)
    args = parser.parse_args()

    # The hard limit on the process's life; no handler, so the kernel ends
    # the process when it fires.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, args.limit_secs))

    app = App(lifespan=False)

    def on_open(ws):
        ws.subscribe(TOPIC)

    def on_message(ws, message, opcode):
        if opcode == OpCode.BINARY:
            # app.publish reaches every subscriber, the sender included
            # (ws.publish would leave the sender out).
            app.publish(TOPIC, message, OpCode.BINARY)

    app.ws(
        "/*",
        {
            "compression": 0,
            "max_payload_length": MAX_PAYLOAD,
            # The reference has no idle timeout; 0 turns uWS's off.
            "idle_timeout": 0,
            "max_backpressure": MAX_BACKPRESSURE,
            "close_on_backpressure_limit": False,
            "send_pings_automatically": False,
            "open": on_open,
            "message": on_message,
        },
    )

    def on_listen(config):
        if config is None:
            print(f"uws: cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
            sys.exit(1)
        print(f"uws: listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)

    app.listen(AppListenOptions(port=args.port, host="127.0.0.1"), on_listen)
    # libuv's own blocking loop: socketify's App.run() drives libuv from
    # asyncio by polling it, which would add its polling to the CPU this
    # relay is measured by.
    app.loop.uv_loop.run()


if __name__ == "__main__":
    main()
