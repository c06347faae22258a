#!/usr/bin/env python3
"""Replaces (or appends) the section of a Markdown file that starts with the
first heading of a snippet, up to the next heading of the same level."""

import sys
from pathlib import Path


def main() -> int:
    splice(Path(sys.argv[1]), Path(sys.argv[2]).read_text())
    return 0


def splice(target: Path, snippet: str) -> None:
    heading = next(l for l in snippet.splitlines() if l.startswith("## "))
    lines = target.read_text().splitlines(keepends=True) if target.exists() else []
    try:
        start = next(i for i, l in enumerate(lines) if l.rstrip("\n") == heading)
    except StopIteration:
        target.write_text("".join(lines).rstrip("\n") + "\n\n" + snippet.strip("\n") + "\n")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = lines[:start] + [snippet.strip("\n") + "\n\n"] + lines[end:]
    target.write_text("".join(new))


if __name__ == "__main__":
    sys.exit(main())
