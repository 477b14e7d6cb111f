"""Registers and spills per kernel from nvcc's `-Xptxas -v` output, side by side for two builds.

    python experiments/ptxas/ptxas_report.py before.txt after.txt > table.md

Each input is the stderr of compiling one .cu file with `-Xptxas -v` for one arch. Kernels are
matched by demangled name; the table lists registers, spill stores / loads (bytes) and stack
frame (bytes) before and after, flags every kernel whose registers or spills grew, and counts
kernels present in only one build.
"""
from __future__ import annotations

import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def parse(path: str) -> dict[str, tuple[int, int, int, int]]:
    kernels: dict[str, tuple[int, int, int, int]] = {}
    name, frame = None, (0, 0, 0)
    for line in open(path, errors="replace"):
        if m := ENTRY.search(line):
            name = m.group(1)
        elif (m := FRAME.search(line)) and name:
            frame = tuple(int(v) for v in m.groups())
        elif (m := USED.search(line)) and name:
            kernels[name] = (int(m.group(1)), frame[1], frame[2], frame[0])
            name = None
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        pretty = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pretty = names
    short = {}
    for n, p in zip(names, pretty):
        p = re.sub(r"npid::cuda::|c10::|\(anonymous namespace\)::|^void ", "", p)
        for i, mode in enumerate(("kScores", "kScoresBwd", "kEstZ", "kNce", "kSoftmax")):
            p = p.replace(f"(Mode){i}", mode)
        depth = 0  # drop the parameter list: the first '(' outside the template arguments
        for i, ch in enumerate(p):
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                p = p[:i]
                break
        short[n] = p
    return short


def main(before: str, after: str) -> None:
    a, b = parse(before), parse(after)
    # Match by readable name: the mangled names change when a kernel leaves an anonymous namespace.
    a = {k: v for k, v in zip(demangle(list(a)).values(), a.values())}
    b = {k: v for k, v in zip(demangle(list(b)).values(), b.values())}
    names = sorted(set(a) | set(b))
    short = {n: n for n in names}
    print("| kernel | registers before / after | spill stores before / after | spill loads before / after | stack before / after |")
    print("|---|---|---|---|---|")
    worse = 0
    for n in sorted(names, key=lambda n: short[n]):
        x, y = a.get(n), b.get(n)
        cell = lambda i: f"{x[i] if x else '—'} / {y[i] if y else '—'}"  # noqa: E731
        flag = ""
        if x and y and (y[0] > x[0] or y[1] > x[1] or y[2] > x[2]):
            flag, worse = " **(worse)**", worse + 1
        print(f"| `{short[n]}`{flag} | {cell(0)} | {cell(1)} | {cell(2)} | {cell(3)} |")
    print()
    print(f"{len(a)} kernels before, {len(b)} after; {len(set(a) & set(b))} in both; "
          f"{worse} with more registers or spills after.")


if __name__ == "__main__":
    main(*sys.argv[1:3])
