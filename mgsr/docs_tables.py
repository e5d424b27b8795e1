"""Result tables in the documentation are copied from committed reports, never typed.

A markdown file marks a generated block with

    <!-- generated: results/testbed/report.md -->            (the report's first table)
    <!-- generated: results/testbed/report.md tables=1,2 --> (its first and second tables, 1-based)
    ...
    <!-- end generated -->

A marker counts only at the start of a line (an indented one, as above, is an example). The path is relative
to the repository root (the same marker works in README.md, docs/*.md and BENCHMARKS.md). Everything
between the markers is replaced by: one stamp line (the report's `commit ... · config ... · machine · wall
time` line, else its `stamp.json` next to it; a report with neither is refused) with a link to the report
relative to the file that holds the block, then the selected tables verbatim.

    python -m mgsr.docs_tables            # refresh every marked block in README.md, docs/*.md and BENCHMARKS.md
    python -m mgsr.docs_tables --check    # exit 1 (and name the files) if any block differs from its report
    python -m mgsr.docs_tables FILE...    # only these files

tests/test_docs.py checks that every block equals what `refresh_text` produces from the committed report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
END = "<!-- end generated -->"
BLOCK = re.compile(r"^<!-- generated: (?P<src>[^\s>]+)(?P<opts>(?: [^\s>]+)*) -->\n(?P<body>.*?)" + re.escape(END),
                   re.S | re.M)
STAMP_KEYS = (("commit", "commit `{}`"), ("config_hash", "config `{}`"), ("machine", "{}"),
              ("wall_time", "wall time {}"), ("date", "{}"))


class DocsTableError(ValueError):
    """A marker names a report that is missing, unstamped or has fewer tables than asked for."""


def tables(text: str) -> list[str]:
    """The markdown tables of `text` (runs of lines starting with `|`), in order, each without a final newline."""
    found, cur = [], []
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            cur.append(line.rstrip())
        elif cur:
            found.append("\n".join(cur))
            cur = []
    if cur:
        found.append("\n".join(cur))
    return found


def stamp(report: Path) -> str:
    """The report's stamp: its `commit `...`` line, else the fields of `stamp.json` beside it."""
    for line in report.read_text().splitlines():
        if line.startswith("commit `"):
            return line.strip()
    sj = report.parent / "stamp.json"
    if sj.is_file():
        data = json.loads(sj.read_text())
        parts = [fmt.format(data[k]) for k, fmt in STAMP_KEYS if data.get(k)]
        if "commit" in data:
            return " · ".join(parts)
    raise DocsTableError(f"{report}: no stamp (no 'commit `...`' line and no stamp.json with a commit)")


def _options(opts: str) -> list[int]:
    which = [1]
    for opt in opts.split():
        key, _, val = opt.partition("=")
        if key != "tables" or not val:
            raise DocsTableError(f"unknown generated-block option {opt!r} (known: tables=1,2,...)")
        which = [int(v) for v in val.split(",")]
    return which


def render(src: str, opts: str, dest: Path, root: Path = REPO) -> str:
    """The body of a generated block for report `src` (relative to `root`) placed in markdown file `dest`."""
    report = (root / src).resolve()
    if not report.is_file():
        raise DocsTableError(f"{dest}: generated block names {src}, which does not exist")
    found = tables(report.read_text())
    which = _options(opts)
    if any(i < 1 or i > len(found) for i in which):
        raise DocsTableError(f"{dest}: {src} has {len(found)} table(s), the block asks for tables={which}")
    link = os.path.relpath(report, dest.resolve().parent).replace(os.sep, "/")
    head = f"*Generated from [{src}]({link}) by `python -m mgsr.docs_tables`: {stamp(report)}.*"
    return "\n\n".join([head, *(found[i - 1] for i in which)]) + "\n"


def refresh_text(text: str, dest: Path, root: Path = REPO) -> str:
    """`text` (the content of markdown file `dest`) with every generated block re-rendered from its report."""
    def sub(m: re.Match) -> str:
        body = render(m["src"], m["opts"], dest, root)
        return f"<!-- generated: {m['src']}{m['opts']} -->\n{body}{END}"

    return BLOCK.sub(sub, text)


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(source, options, body) of every generated block in `text`."""
    return [(m["src"], m["opts"], m["body"]) for m in BLOCK.finditer(text)]


def doc_files(root: Path = REPO) -> list[Path]:
    """README.md, every docs/*.md and BENCHMARKS.md: the files whose blocks the CLI refreshes by default."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "BENCHMARKS.md"]


def refresh_files(paths, root: Path = REPO, check: bool = False) -> list[Path]:
    """Refresh the blocks of `paths` (write them unless `check`); returns the files whose blocks were stale."""
    stale = []
    for path in map(Path, paths):
        text = path.read_text()
        new = refresh_text(text, path, root)
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new)
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mgsr.docs_tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md, docs/*.md, BENCHMARKS.md)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = ap.parse_args(argv)
    try:
        stale = refresh_files(args.files or doc_files(), check=args.check)
    except DocsTableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in stale:
        print(f"{'stale' if args.check else 'refreshed'}: {path}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
