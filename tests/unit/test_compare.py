"""The family's comparison files from the flow's rows: every member in the tables (a failed one with its reason),
the trained ones in the plot."""

from __future__ import annotations

import csv
import io

from pipelines.registry import compare

ROWS = [
    {"variant": "efficientnet_b0", "status": "trained", "params": 5_288_548, "gmacs": 0.3897, "train_resolution": 224,
     "eval_resolution": 224, "minival_top1": 77.1, "val_top1": 77.3, "val_top5": 93.5, "wall_clock_hours": 20.5,
     "gpu_hours": 164.0, "version": "3", "champion": True},
    {"variant": "efficientnet_b1", "status": "trained", "params": 7_794_184, "gmacs": 0.6913, "train_resolution": 240,
     "eval_resolution": 240, "minival_top1": 79.0, "val_top1": 79.2, "val_top5": 94.5, "wall_clock_hours": 31.0,
     "gpu_hours": 248.0, "version": "1", "champion": False},
    {"variant": "efficientnet_b7", "status": "failed", "reason": "Ray job x failed: out of memory"},
]


def test_the_table_lists_every_member_and_why_one_failed() -> None:
    cells = list(csv.reader(io.StringIO(compare.to_csv(ROWS))))
    assert cells[0][0] == "variant" and cells[0][-1] == "status"
    assert [row[0] for row in cells[1:]] == ["efficientnet_b0", "efficientnet_b1", "efficientnet_b7"]
    b0 = dict(zip(cells[0], cells[1]))
    assert (b0["params (M)"], b0["GMACs"], b0["val top-1"], b0["GPU-h"]) == ("5.289", "0.3897", "77.30", "164.000")
    b7 = dict(zip(cells[0], cells[3]))
    assert b7["params (M)"] == "-" and b7["status"] == "failed: Ray job x failed: out of memory"


def test_markdown_and_html_hold_the_same_rows() -> None:
    md = compare.to_markdown(ROWS).splitlines()
    assert md[0].startswith("| variant |") and set(md[1]) == {"|", "-"} and len(md) == 2 + len(ROWS)
    page = compare.to_html(ROWS, "b0-b7 <demo>")
    assert "b0-b7 &lt;demo&gt;" in page and page.count("<tr>") == 1 + len(ROWS)
    assert "src='comparison.png'" in page


def test_the_files_are_written(tmp_path) -> None:
    paths = compare.write_comparison(ROWS, tmp_path, "family")
    assert [p.name for p in paths] == list(compare.FILES)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 10_000
    text = compare.to_text(ROWS).splitlines()
    assert len(text) == 1 + len(ROWS) and text[3].startswith("efficientnet_b7")
