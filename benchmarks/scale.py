"""Speed at the scale users run: one row per part, each a ratio measured inside this one run.

Rows (each measured by the module named in :data:`ROWS`, whose docstring says exactly what it times):

* ``per-class-logging-C8142``: ``validate`` time of the classification task with per-class output
  against without, at iNaturalist-2018's 8,142 classes (target <= 1.2);
* ``memory-bank-ddp``: bytes received per rank per step by the AUCSeg memory bank under 2-process CPU DDP
  in an ADE20K-like setting, against the bytes of the entries actually kept (target <= 2), and the step
  time against no bank;
* ``device-data-path``: images/s of ``fit`` with the device-resident data path against a synthetic-batch
  run of the same model without data loading (the compute-only limit; target >= 0.8 on a GPU);
* ``sampling-free-prior``: time of the sampling-free prior count against one training epoch (target <= 0.1).

Each part module exposes ``run(args) -> (row, setup)`` where ``row`` is ``{"name": ROW, KEY: VALUE, ...}``
and ``setup`` describes what it measured. Writes ``benchmarks/results/<name>.json`` and ``.md``.

    python benchmarks/scale.py                         # every row
    python benchmarks/scale.py --rows memory-bank-ddp --keep-rows   # re-run one row, keep the others
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, set_threads, write_results  # noqa: E402

#: Row name -> module (in ``benchmarks/``) whose ``run(args)`` measures it.
ROWS = {
    "per-class-logging-C8142": "scale_logging",
    "memory-bank-ddp": "scale_memory_bank",
    "device-data-path": "scale_device",
    "sampling-free-prior": "scale_prior",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--name", default="scale", help="results/<name>.json (scale-gpu on a GPU)")
    parser.add_argument("--keep-rows", action="store_true", help="keep the other rows of an existing results file")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--note", action="append", default=[], help="a line for the results note")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script end to end")
    args = parser.parse_args(argv)
    set_threads()

    path = RESULTS_DIR / f"{args.name}.json"
    rows: dict[str, dict] = {}
    setup: dict = {"environment": environment(), "rows": {}}
    if args.keep_rows and path.exists():
        old = json.loads(path.read_text())
        rows = {row["name"]: row for row in old["rows"]}
        setup["rows"] = dict(old["setup"].get("rows", {}))
        setup["notes"] = list(old["setup"].get("notes", []))  # the kept rows' notes stay in the markdown
    for name in args.rows:
        module = importlib.import_module(ROWS[name])
        row, row_setup = module.run(args)
        if row["name"] != name:
            raise RuntimeError(f"{ROWS[name]}.run returned the row {row['name']!r}, expected {name!r}")
        rows[name] = row
        setup["rows"][name] = row_setup
        print(json.dumps(row), flush=True)
    ordered = [rows[n] for n in ROWS if n in rows]
    columns = sorted({k for row in ordered for k in row if k != "name"})
    notes = [*setup.pop("notes", []), *args.note]
    write_results(args.name, setup, ordered, columns, notes)
    results = json.loads(path.read_text())  # keep the notes in the JSON too, for the next --keep-rows run
    results["setup"]["notes"] = notes
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
