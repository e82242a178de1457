#!/usr/bin/env python3
"""A complete Baton `command` agent: copy it and put your own logic in `reply()`.

Baton runs this program once per task. It writes one JSON object to stdin, then closes it:

    {"session": {...}, "interaction": {"id", "content", "metadata", ...},
     "history": [earlier completed interactions of this epoch, oldest first],
     "context": {...the session's context...}}

and reads stdout, one JSON object per line:

    {"type": "delta", "text": "..."}          more response text, streamed to every client
    {"type": "progress", "data": <any JSON>}   structured progress (a step, a tool call...)
    {"type": "context", "patch": {...}}        an RFC 7396 merge patch of the session's context
    {"type": "result", "response": "..."}      the end; "response" is optional and replaces
                                               the concatenated deltas
    {"type": "error", "message": "..."}        the end, as a failure

Exiting with status 0 without a result completes the task with the deltas; a non-zero status
fails it (the end of stderr goes into the error message). Stderr is for logs. On cancel (or
timeout) Baton sends SIGTERM to the process group, then SIGKILL after `kill_grace_ms`.

Configure it in baton.toml:

    [agents.py]
    kind = "command"
    program = "python3"
    args = ["examples/agent.py"]
    timeout_s = 600
"""

import json
import signal
import sys
import time


def emit(**output):
    # One line per output, flushed at once so it streams to clients as it is produced.
    sys.stdout.write(json.dumps(output) + "\n")
    sys.stdout.flush()


def reply(content, history, context):
    """Yields the response piece by piece. Replace this with a call to your model or tools."""
    number = len(history) + 1
    text = f"You said: {content} (message {number} of this conversation)"
    for i, word in enumerate(text.split(" ")):
        yield word if i == 0 else " " + word


def main():
    # Stop promptly when Baton cancels the task.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    request = json.load(sys.stdin)
    content = request["interaction"]["content"]
    history = request["history"]
    context = request["context"]
    print(f"task {request['interaction']['id']}: {len(content)} characters", file=sys.stderr)

    emit(type="progress", data={"step": "thinking", "history": len(history)})
    delay = float(context.get("delay", 0))
    for piece in reply(content, history, context):
        if delay:
            time.sleep(delay)
        emit(type="delta", text=piece)

    seen = int(context.get("messages_seen", 0)) + 1
    emit(type="context", patch={"messages_seen": seen})
    emit(type="result")


if __name__ == "__main__":
    main()
