#!/usr/bin/env python3
"""How many of the demo's planted near-duplicates `featpipe dedup` grouped with their original.

python tools/demo_report.py DEDUP_OUT
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path


def main() -> None:
    groups = json.loads((Path(sys.argv[1]) / "groups.json").read_text())
    group_of = {p: i for i, g in enumerate(groups) for p in g["paths"]}
    found, planted, strays = Counter(), Counter(), 0
    for path, gid in sorted(group_of.items()):
        m = re.search(r"near_dups/(IMG_\d{4})_(\w+)\.jpg$", path)
        if m:
            original = next((p for p in groups[gid]["paths"] if p.endswith(f"photos/{m.group(1)}.jpg")), None)
            found[m.group(2)] += original is not None
    for g in groups:
        stems = {re.search(r"(IMG_\d{4})", p).group(1) if re.search(r"IMG_\d{4}", p) else p for p in g["paths"]}
        strays += len(stems) > 1
    planted.update({kind: 6 for kind in ("copy", "reencoded", "resized", "cropped")})
    parts = ", ".join(f"{kind} {found[kind]}/{planted[kind]}" for kind in planted)
    print(
        f"dedup grouped {sum(found.values())} of {sum(planted.values())} planted near-duplicates with their "
        f"original ({parts}); {len(groups)} groups, {strays} mixing unrelated images"
    )


if __name__ == "__main__":
    main()
