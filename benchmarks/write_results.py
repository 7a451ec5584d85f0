"""Markdown result sections.

Each benchmark script writes its own section file (``--results-md PATH``, default
benchmarks/results/<name>_h100.md) containing

    ## <title> — <GPU name>, <date>

    <one line of context>

    <markdown table>

Pasting into benchmarks/RESULTS.md can be done by hand, or with this script, which
replaces a section whose heading starts with the same "## <title> — " (or appends it):

    python benchmarks/write_results.py benchmarks/results/forward_h100.md \
        benchmarks/results/decode_h100.md --into benchmarks/RESULTS.md

Without section files it merges every default section present in --results-dir (default
benchmarks/results), in this order: forward_h100.md, decode_h100.md, splits_sweep_h100.md
(sweep_num_splits.py), host_overhead_h100.md (host_overhead.py); missing ones are skipped:

    python benchmarks/write_results.py --into benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

SEP = " \u2014 "  # " — "
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SECTIONS = ["forward_h100.md", "decode_h100.md", "splits_sweep_h100.md", "host_overhead_h100.md"]


def write_json(path: str, obj) -> None:
    """Write a benchmark's raw rows (creating the folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


def section_text(title: str, gpu: str, date: str, body: str) -> str:
    return f"## {title}{SEP}{gpu}, {date}\n\n{body.rstrip()}\n"


def write_section(path: str, title: str, gpu: str, date: str, body: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    text = section_text(title, gpu, date, body)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _split_sections(text: str):
    """Return (preamble, [section_text, ...]) split at lines starting with '## '."""
    parts = re.split(r"(?m)^(?=## )", text)
    if parts and not parts[0].startswith("## "):
        return parts[0], parts[1:]
    return "", parts


def merge_into(results_md: str, section: str) -> None:
    section = section.rstrip() + "\n"
    first = section.splitlines()[0]
    if not first.startswith("## "):
        raise ValueError("section must start with a '## ' heading")
    key = first.split(SEP)[0] if SEP in first else first
    old = ""
    if os.path.exists(results_md):
        with open(results_md, encoding="utf-8") as f:
            old = f.read()
    pre, secs = _split_sections(old)
    out, replaced = [], False
    for s in secs:
        head = s.splitlines()[0] if s else ""
        hkey = head.split(SEP)[0] if SEP in head else head
        if hkey == key and not replaced:
            out.append(section + "\n")
            replaced = True
        else:
            out.append(s if s.endswith("\n") else s + "\n")
    if not replaced:
        if out and not out[-1].endswith("\n\n"):
            out[-1] = out[-1] + "\n"
        elif not out and pre and not pre.endswith("\n\n"):
            pre = pre.rstrip("\n") + "\n\n"
        out.append(section)
    if not pre and not secs:
        pre = "# Benchmark results\n\n"
    with open(results_md, "w", encoding="utf-8") as f:
        f.write(pre + "".join(out).rstrip() + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*",
                   help="section .md files written by the benchmark scripts (default: the default sections "
                        "present in --results-dir: " + ", ".join(DEFAULT_SECTIONS) + ")")
    p.add_argument("--into", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"),
                   help="where to look for the default sections (default benchmarks/results)")
    a = p.parse_args(argv)
    sections = a.sections
    if not sections:
        sections = []
        for name in DEFAULT_SECTIONS:
            path = os.path.join(a.results_dir, name)
            if os.path.exists(path):
                sections.append(path)
            else:
                print(f"skipped {path} (not present)")
        if not sections:
            print(f"no section files found in {a.results_dir}")
            return 1
    for path in sections:
        with open(path, encoding="utf-8") as f:
            merge_into(a.into, f.read())
        print(f"merged {path} -> {a.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
