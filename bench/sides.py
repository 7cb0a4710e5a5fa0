"""``python -m bench.sides ENGINE ANCHOR CLIENTS... --rounds N``: the table
``bench/side_by_side.sh`` ends with. Each system ran ``N`` rounds per client
count, in alternating order (llmq first in even rounds, the anchor first in
odd ones), so a machine that drifts during the run favours neither side; a
figure is the median over the rounds, and every round is printed."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

OUT = Path("var/bench")


def _round(engine: str, system: str, clients: int, r: int) -> dict[str, float]:
    path = OUT / f"{engine}-{system}-c{clients}-r{r}.json"
    data = json.loads(path.read_text())
    return data["runs"]["http"] if "runs" in data else data  # type: ignore[no-any-return]  # bench http / closedloop


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sides", description=__doc__)
    ap.add_argument("engine")
    ap.add_argument("anchor")
    ap.add_argument("clients", type=int, nargs="+")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    table = Table(title=f"llmq ({args.engine}) beside {args.anchor}, median of {args.rounds} round(s)")
    for col in ("clients", "", "llmq", args.anchor, "ratio", "rounds (llmq / anchor)"):
        table.add_column(col, justify="right")
    for c in args.clients:
        runs = {s: [_round(args.engine, s, c, r) for r in range(args.rounds)] for s in ("llmq", args.anchor)}
        for label, key, scale, unit, fmt in (("output tokens/s", "tokens_per_s", 1, "", ".1f"),
                                             ("TTFT p50", "ttft_p50_s", 1000, " ms", ".1f"),
                                             ("ITL p50", "itl_p50_s", 1000, " ms", ".2f")):
            if any(key not in run for rs in runs.values() for run in rs):
                continue  # bench.closedloop measures no inter-token time
            ours = [run[key] * scale for run in runs["llmq"]]
            theirs = [run[key] * scale for run in runs[args.anchor]]
            mine, anchor = statistics.median(ours), statistics.median(theirs)
            table.add_row(str(c), label, f"{mine:{fmt}}{unit}", f"{anchor:{fmt}}{unit}", f"{mine / anchor:.3f}x",
                          "  ".join(f"{a:{fmt}}/{b:{fmt}}" for a, b in zip(ours, theirs)))
        errors = {s: sum(run["errors"] for run in runs[s]) for s in runs}
        if any(errors.values()):
            table.add_row(str(c), "errors", str(errors["llmq"]), str(errors[args.anchor]), "", "")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
