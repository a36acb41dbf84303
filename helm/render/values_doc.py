#!/usr/bin/env python3
"""The chart's values table, from the comments of values.yaml.

    values_doc.py values.yaml --table            # prints the Markdown table
    values_doc.py values.yaml --update README.md  # rewrites README's table
    values_doc.py values.yaml --check README.md   # README's table is current

A value is documented by a comment block starting with "# --" right above
its key (the helm-docs convention); a mapping without one is a section and
its keys are documented one by one. A key that is neither a section nor
documented is an error, and so is a README whose table (the lines from its
header row to the first line that is not a row) differs from the one
values.yaml makes.
"""

import argparse
import json
import re
import sys

import yaml

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


def documented(lines):
    """Yields (path, description) for every documented value, and
    (path, None) for a leaf with no "# --" comment."""
    stack = []  # (indent, key)
    comment = []
    skip_below = None  # indent of a documented value: its children are its default
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(line)
            continue
        if not stripped:
            comment = []
            continue
        m = KEY.match(line)
        indent = len(line) - len(line.lstrip(" "))
        if skip_below is not None:
            if indent > skip_below or stripped.startswith("- "):
                comment = []
                continue
            skip_below = None
        if m is None:  # a list item of an undocumented key's default
            comment = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group("key")])
        block = [c.strip() for c in comment if len(c) - len(c.lstrip(" ")) == indent]
        comment = []
        start = next((i for i, c in enumerate(block) if c.startswith("# --")), None)
        rest = m.group("rest").strip()
        if start is not None:
            text = " ".join(re.sub(r"^# ?(-- )?", "", c) for c in block[start:])
            yield path, text.strip()
            skip_below = indent
            continue
        if rest == "" or rest.startswith("#"):
            stack.append((indent, m.group("key")))  # a section
            continue
        yield path, None


def default(values, path):
    v = values
    for k in path.split("."):
        v = v[k]
    text = json.dumps(v, separators=(", ", ": "))
    if len(text) > 60:
        text = "see values.yaml"
    return text.replace("|", "\\|")


HEADER = "| value | default | meaning |"


def table(values, entries):
    rows = [HEADER, "| --- | --- | --- |"]
    for p, d in entries:
        if d is not None:
            rows.append(f"| `{p}` | `{default(values, p)}` | {d.replace('|', '/')} |")
    return rows


def split_readme(text):
    """README lines before the table, the table, and after it."""
    lines = text.splitlines()
    if HEADER not in lines:
        return lines, [], []
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[:start], lines[start:end], lines[end:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("values")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--update", metavar="README")
    ap.add_argument("--check", metavar="README")
    args = ap.parse_args()
    with open(args.values) as f:
        text = f.read()
    values = yaml.safe_load(text)
    entries = list(documented(text.splitlines()))
    undocumented = [p for p, d in entries if d is None]
    for p in undocumented:
        print(f"  FAIL values.yaml: {p} has no '# --' comment")
    rc = 1 if undocumented else 0
    rows = table(values, entries)
    if args.table:
        print("\n".join(rows))
    if args.update:
        with open(args.update) as f:
            before, _, after = split_readme(f.read())
        with open(args.update, "w") as f:
            f.write("\n".join(before + rows + after) + "\n")
    if args.check:
        with open(args.check) as f:
            _, current, _ = split_readme(f.read())
        if current != rows:
            missing = [r for r in rows if r not in current]
            extra = [r for r in current if r not in rows]
            for r in missing:
                print(f"  FAIL {args.check}: lacks or differs in the row {r[:100]}")
            for r in extra:
                print(f"  FAIL {args.check}: has a row values.yaml does not make: {r[:100]}")
            print(f"  (regenerate: python3 helm/render/values_doc.py {args.values} --update {args.check})")
            rc = 1
        else:
            print(f"  ok: {len(rows) - 2} values, each described in values.yaml and in {args.check}'s table")
    return rc


if __name__ == "__main__":
    sys.exit(main())
