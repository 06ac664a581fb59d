"""Real English prose that every Python install has, as per-user text for `fleet-ingest`.

Python's own documentation topics (`pydoc_data.topics`) are split into paragraphs (blank-line
separated, whitespace collapsed, at least 5 words), taken in sorted topic order, and dealt out
three consecutive paragraphs to a user. Usage:

    python benchmarks/realtext/pydoc_users.py users.jsonl
    fleet-ingest users.jsonl corpus/ --user-column user --text-column text --vocab-size 1000
"""

from __future__ import annotations

import json
import pydoc_data.topics
import sys


def main(out: str) -> None:
    topics = pydoc_data.topics.topics
    chunks = (p for key in sorted(topics) for p in topics[key].split("\n\n"))
    paragraphs = [" ".join(p.split()) for p in chunks if len(p.split()) >= 5]
    with open(out, "w") as f:
        for user in range(len(paragraphs) // 3):
            text = "\n".join(paragraphs[3 * user : 3 * user + 3])
            f.write(json.dumps({"user": f"u{user}", "text": text}) + "\n")
    print(f"{len(paragraphs) // 3} users of 3 paragraphs each -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
