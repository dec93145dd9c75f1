"""benchmarks/sam_family.py: a short run of the whole script (every row, two seeds) and its notes."""

import json

from tests.test_benchmarks_common import QUIET_BENCHMARK_RUN, _load

pytestmark = QUIET_BENCHMARK_RUN


def test_short_run_writes_every_row_with_seed_spread_and_the_directions(tmp_path):
    sam_family = _load("sam_family")
    path = sam_family.main(
        ["--epochs", "2", "--seeds", "0", "1", "--val-every", "1", "--workers", "1", "--results-dir", str(tmp_path)]
    )
    result = json.loads(path.read_text())
    assert result["benchmark"] == "sam_family"
    assert result["setup"]["class_counts"] == [130, 84, 54, 35, 22, 14, 9, 6, 4, 2]
    rows = result["rows"]
    assert [row["name"] for row in rows] == ["CE", "SAM", "ImbSAM", "SSE-SAM", "SAM-every-4"]
    for row in rows:
        assert row["seeds"] == [0, 1] and len(row["runs"]) == 2
        for key in ("acc", "acc_many", "acc_medium", "acc_few", "acc_best"):
            assert 0 <= row[key] <= 1 and row[f"{key}_std"] is not None
        assert all(run["best_epoch"] in (1, 2) for run in row["runs"])
    # the same seed and no perturbation: CE's two runs differ only by the seed, so rerunning seed 0 repeats it
    again = sam_family.train("CE", 0, sam_family.parse_args(["--epochs", "2"]))
    assert again["acc"] == rows[0]["runs"][0]["acc"]
    text = (tmp_path / "sam_family.md").read_text()
    for name in ("SAM", "ImbSAM", "SSE-SAM", "SAM-every-4"):
        assert f"- {name}: acc_few vs CE " in text
    assert text.count("acc_few vs SAM") == 2  # ImbSAM and SSE-SAM against SAM
