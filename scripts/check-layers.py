#!/usr/bin/env python3
"""Checks the crate's module graph: the layers import only downwards, and no modules form a cycle.

    python3 scripts/check-layers.py          # exit 1 and one line per violation when broken

The layers, lowest first, are the folders of src/ (and src/error.rs): a module may import from
its own layer and the layers below it, never above. Edges come from `crate::...` and `super::...`
paths in non-test code (a file's `#[cfg(test)] mod tests` block is left out: tests may reach
across). Within the graph of modules (one node per file), every strongly connected component
must be a single module.
"""

import os
import re
import sys

LAYERS = ["error", "format", "core", "fs", "daemon", "cli"]
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def modules():
    """Maps each module path ("core::pool") to its file."""
    found = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".rs") or name in ("lib.rs", "main.rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            found["::".join(parts)] = os.path.join(dirpath, name)
    return found


def non_test_source(text):
    """The file without its `#[cfg(test)]` items (a `mod tests` block runs to the file's end)."""
    match = re.search(r"^#\[cfg\(test\)\]\s*\n\s*(pub(\(crate\))? )?mod \w+", text, re.M)
    text = text[: match.start()] if match else text
    # Single test-only items (a fixture, a helper): the attribute and the item's first line.
    return re.sub(r"#\[cfg\(test\)\][^\n]*\n[^\n]*\n", "\n", text)


def expand_uses(text):
    """Every `crate::a::b` path named in the text, with `use crate::{a, b::{c, d}}` groups
    expanded."""
    text = re.sub(r"//[^\n]*", "", text)
    paths = []
    for group in re.finditer(r"\b(crate|super)::\{", text):
        depth, i = 1, group.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        inner = text[group.end() : i - 1]
        for item in re.split(r",(?![^{]*\})", inner):
            item = item.strip()
            if item:
                paths.append(group.group(1) + "::" + re.sub(r"\s+", "", item))
    paths += re.findall(r"\b(?:crate|super)(?:::\w+)+", text)
    return paths


def resolve(path, module, known):
    """The module a `crate::`/`super::` path points into: its longest prefix that is a module."""
    parts = path.split("::")
    if parts[0] == "super":
        base = module.split("::")
        # A file `a/b.rs` is module a::b; `super` is a.
        while parts and parts[0] == "super":
            base = base[:-1]
            parts = parts[1:]
        parts = base + parts
    else:
        parts = parts[1:]
    parts = [p for p in parts if re.fullmatch(r"\w+", p)]
    for n in range(len(parts), 0, -1):
        candidate = "::".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def layer(module):
    return LAYERS.index(module.split("::")[0])


def strongly_connected(graph):
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    known = modules()
    unknown_layer = [m for m in known if m.split("::")[0] not in LAYERS]
    problems = [f"{m}: not in a known layer ({', '.join(LAYERS)})" for m in unknown_layer]
    graph = {m: set() for m in known}
    for module, path in known.items():
        with open(path) as f:
            source = non_test_source(f.read())
        for used in expand_uses(source):
            target = resolve(used, module, known)
            if target is None or target == module or target.startswith(module + "::"):
                continue
            if module.startswith(target + "::"):
                continue  # a module using its parent's items (a folder's mod.rs)
            graph[module].add(target)
            if module in unknown_layer or target in unknown_layer:
                continue
            if layer(target) > layer(module):
                problems.append(
                    f"{module} imports {target}: `{LAYERS[layer(module)]}` may not use the layer "
                    f"above it, `{LAYERS[layer(target)]}`"
                )
    for component in strongly_connected(graph):
        if len(component) > 1:
            problems.append("import cycle: " + " <-> ".join(component))
    for problem in sorted(set(problems)):
        print(f"layers: {problem}")
    if problems:
        print(f"layers: {len(set(problems))} problem(s); see the layer list in src/lib.rs")
        return 1
    edges = sum(len(v) for v in graph.values())
    print(f"layers: ok ({len(known)} modules, {edges} imports, no cycle, no upward import)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
