#!/usr/bin/env python3
"""A Baton `command` agent that asks for approval before it acts (human in the loop).

The first run plans the action, streams what it is about to do, and asks:

    {"type": "ask", "data": {"question": "...", "options": ["yes", "no"]}}

Baton then makes the interaction `waiting` (its `request` holds that data, with an id), stops
this program, and waits for a client's answer, minutes or days later, on any node, across
restarts:

    POST /v1/sessions/{id}/interactions/{iid}/answer  {"request_id": "...", "answer": "yes"}

or the WebSocket op {"op": "answer", "interaction_id", "request_id", "answer"}. The answer
runs this program again for the same interaction; its stdin then also holds

    "answers":  [{"request": {"id", "data"}, "answer": ...}, ...]   every ask so far, in order
    "response": "..."                                               the text produced so far

so a program picks up where it stopped: the LangGraph `interrupt()` model, re-run style. The
interaction's final response is the text before the ask followed by the text after it.

Configure it in baton.toml:

    [agents.careful]
    kind = "command"
    program = "python3"
    args = ["examples/approval_agent.py"]
    input_timeout_s = 3600      # unanswered for an hour: cancelled (reason "timeout")
"""

import json
import signal
import sys


def emit(**output):
    sys.stdout.write(json.dumps(output) + "\n")
    sys.stdout.flush()


def approved(answer):
    """Accepts "yes", true, or {"approved": true} as a yes."""
    if isinstance(answer, dict):
        answer = answer.get("approved", answer.get("answer"))
    if isinstance(answer, str):
        return answer.strip().lower() in ("yes", "y", "ok", "approve", "approved")
    return answer is True


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    request = json.load(sys.stdin)
    task = request["interaction"]["content"]
    answers = request.get("answers", [])

    if not answers:
        # First run: say what would happen, then stop and ask.
        emit(type="delta", text=f"Plan: {task}. ")
        emit(type="ask", data={"question": f"May I {task}?", "options": ["yes", "no"]})
        return

    # Run again with the answer: act on it.
    if approved(answers[-1]["answer"]):
        emit(type="delta", text="Approved: done.")
    else:
        emit(type="delta", text="Not approved: nothing was changed.")
    emit(type="result")


if __name__ == "__main__":
    main()
