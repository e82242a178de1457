"""A `command` agent for the tests: asks once, then finishes with the answer it got."""

import json
import sys

turn = json.load(sys.stdin)
answers = turn.get("answers") or []


def emit(**line: object) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


if not answers:
    emit(type="delta", text="asking ")
    emit(type="ask", data={"question": "proceed?"})
else:
    emit(type="delta", text=f"answered {json.dumps(answers[-1]['answer'])}")
    emit(type="result")
