"""A backend using Baton's Python client: create a session for a customer, mint a token the
browser uses to reach that one session, and stream a reply to the terminal.

    pip install ./clients/python
    BATON_URL=http://127.0.0.1:7420 BATON_KEY=bk_... python examples/python/backend.py

`BATON_KEY` is a tenant's API key (`baton key new`); minting tokens needs access control on
(`[auth] mode = "keys"` with a `token_secret_env`). Without a key, the token step is skipped.
"""

from __future__ import annotations

import os
import sys

from baton import Baton, Interaction


def main(url: str, api_key: str | None, session_id: str = "support-42") -> int:
    with Baton(url, api_key=api_key) as baton:
        session = baton.put_session(session_id, context={"customer": "ada"})
        if api_key:
            token = baton.mint_token(session_id, scope="write", ttl_s=3600)
            # Hand this to the browser: it reaches this session only, until it expires.
            print(f"browser token for {token.session} ({token.scope}, until {token.expires_at})")
        sent = baton.send(session_id, "hello from the backend")
        if not isinstance(sent, Interaction):
            return 1
        # Every event after the session as it was before the message: nothing is missed.
        for event in baton.events(session_id, after=session.last_seq):
            carried = event.interaction
            about = event.data.get("interaction_id") or (carried.id if carried else None)
            if about != sent.id:
                continue
            if event.type == "task.delta":
                print(event.data["text"], end="", flush=True)
            elif event.type in ("task.completed", "task.failed", "task.cancelled"):
                print()
                return 0 if event.type == "task.completed" else 1
    return 1


if __name__ == "__main__":
    sys.exit(main(os.environ.get("BATON_URL", "http://127.0.0.1:7420"), os.environ.get("BATON_KEY")))
