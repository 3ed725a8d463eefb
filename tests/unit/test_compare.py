"""The family's comparison files from the flow's rows: every member in the tables (a failed one with its reason),
the same cells in every format, and the trained ones in the plots at their own numbers."""

from __future__ import annotations

import csv
import io
import re
from html.parser import HTMLParser

import pytest

from pipelines.registry import compare

ROWS = [
    {"variant": "efficientnet_b0", "status": "trained", "params": 5_288_548, "gmacs": 0.3897, "train_resolution": 224,
     "eval_resolution": 224, "minival_top1": 77.1, "val_top1": 77.3, "val_top5": 93.5, "wall_clock_hours": 20.5,
     "gpu_hours": 164.0, "version": "3", "champion": True},
    {"variant": "efficientnet_b1", "status": "trained", "params": 7_794_184, "gmacs": 0.6913, "train_resolution": 240,
     "eval_resolution": 240, "minival_top1": 79.0, "val_top1": 79.2, "val_top5": 94.5, "wall_clock_hours": 31.0,
     "gpu_hours": 248.0, "version": "1", "champion": False},
    # A reason with the characters Markdown and HTML escape.
    {"variant": "efficientnet_b7", "status": "failed", "reason": "Ray job x failed: out of memory | <oom> & more"},
]


def test_the_table_lists_every_member_and_why_one_failed() -> None:
    cells = list(csv.reader(io.StringIO(compare.to_csv(ROWS))))
    assert cells[0][0] == "variant" and cells[0][-1] == "status"
    assert [row[0] for row in cells[1:]] == ["efficientnet_b0", "efficientnet_b1", "efficientnet_b7"]
    b0 = dict(zip(cells[0], cells[1]))
    assert (b0["params (M)"], b0["GMACs"], b0["val top-1"], b0["GPU-h"]) == ("5.289", "0.3897", "77.30", "164.000")
    b7 = dict(zip(cells[0], cells[3]))
    assert b7["params (M)"] == "-" and b7["status"] == "failed: Ray job x failed: out of memory | <oom> & more"


def markdown_cells(text: str) -> list[list[str]]:
    """A Markdown table's cells, header first (the rule under it dropped), `\\|` read back as `|`."""
    lines = text.strip().splitlines()
    assert set(lines[1]) == {"|", "-"}, lines[1]
    rows = [re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in [lines[0], *lines[2:]]]
    return [[cell.strip().replace("\\|", "|") for cell in row] for row in rows]


class _Cells(HTMLParser):
    """The text of every th/td cell of a page, row by row (entities read back as characters)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def html_cells(page: str) -> list[list[str]]:
    parser = _Cells()
    parser.feed(page)
    return parser.rows


@pytest.mark.parametrize("rows, columns", [
    (ROWS, compare.COLUMNS),
    (compare.champion_rows([{**ROWS[0], "init_from": "models:/b0/2", "promotion_top1": 77.1,
                             "champion_before": "2", "champion_before_top1": 76.0, "promotion": "promoted: better"},
                            ROWS[2]]), compare.CHAMPION_COLUMNS),
])
def test_markdown_html_csv_and_text_hold_the_same_cells(rows, columns) -> None:
    expected = compare.table(rows, columns)
    assert len(expected) == 1 + len(rows) and len({len(row) for row in expected}) == 1
    assert markdown_cells(compare.to_markdown(rows, columns)) == expected
    assert html_cells(compare.to_html(rows, "title", columns=columns)) == expected
    assert list(csv.reader(io.StringIO(compare.to_csv(rows, columns)))) == expected
    # The text table: each line's cells start at its header's columns.
    lines = compare.to_text(rows, columns).splitlines()
    starts = [0]
    for header in expected[0][1:]:
        starts.append(lines[0].index("  " + header, starts[-1]) + 2)
    for line, row in zip(lines, expected):
        assert [line[s:s + len(cell)] for s, cell in zip(starts, row)] == row, line


def test_the_page_names_its_title_and_image() -> None:
    page = compare.to_html(ROWS, "b0-b7 <demo>")
    assert "<title>b0-b7 &lt;demo&gt;</title>" in page and "<h2>b0-b7 &lt;demo&gt;</h2>" in page
    assert "<img src='comparison.png'" in page
    assert "<img" not in compare.to_html(ROWS, "t", image=None)


def labelled_points(ax) -> list[tuple[str, tuple[float, float]]]:
    """Each annotation of an axes: its text and the data point it labels."""
    return [(t.get_text(), tuple(map(float, t.xy))) for t in ax.texts]


def test_the_plot_puts_each_trained_member_at_its_size_and_top1() -> None:
    fig = compare.family_figure(ROWS, "family")
    by_params, by_gmacs, hours = fig.axes
    assert labelled_points(by_params) == [("efficientnet_b0", (5.288548, 77.3)), ("efficientnet_b1", (7.794184, 79.2))]
    assert labelled_points(by_gmacs) == [("efficientnet_b0", (0.3897, 77.3)), ("efficientnet_b1", (0.6913, 79.2))]
    for ax in (by_params, by_gmacs):
        (line,) = ax.lines  # the members joined in order of size
        assert line.get_xydata().tolist() == [list(p) for _, p in labelled_points(ax)]
        assert ax.get_xscale() == "log" and ax.get_ylabel() == "val top-1 (%)"
    assert [bar.get_height() for bar in hours.patches] == [20.5, 31.0]  # wall-clock hours; the failed one not drawn
    assert [t.get_text() for t in hours.get_xticklabels()] == ["efficientnet_b0", "efficientnet_b1"]
    assert fig.get_suptitle() == "family"


def test_the_plot_sorts_by_size_and_leaves_out_what_a_log_axis_cannot_show() -> None:
    rows = [{**ROWS[1], "gmacs": 0.0}, ROWS[0]]  # b1 first, and without GMACs
    by_params, by_gmacs, _ = compare.family_figure(rows, "t").axes
    assert [name for name, _ in labelled_points(by_params)] == ["efficientnet_b0", "efficientnet_b1"]
    assert labelled_points(by_gmacs) == [("efficientnet_b0", (0.3897, 77.3))]


def test_the_files_hold_the_figure_and_the_table(tmp_path) -> None:
    paths = compare.write_comparison(ROWS, tmp_path, "family <b0-b7>")
    assert paths == [tmp_path / name for name in compare.FILES]
    png, page, sheet = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert (width, height) == (1600, 480)  # the figure's 16 x 4.8 inches at 100 dpi
    assert html_cells(page.read_text()) == compare.table(ROWS)
    assert f"src='{png.name}'" in page.read_text() and "family &lt;b0-b7&gt;" in page.read_text()
    assert list(csv.reader(io.StringIO(sheet.read_text()))) == compare.table(ROWS)


def _study_row(method: str, target: float, gmacs: float, top1: float, status: str = "trained") -> dict:
    return {"method": method, "target": target, "gmacs": gmacs, "val_top1": top1, "status": status}


def test_the_study_plot_draws_each_method_from_the_baseline() -> None:
    rows = [_study_row("baseline", 1, 0.4, 40), _study_row("width", 4, 1.6, 52), _study_row("width", 2, 0.8, 45),
            _study_row("compound", 2, 0.81, 47), {"method": "depth", "target": 2, "status": "failed", "reason": "x"}]
    (ax,) = compare.study_figure(rows, "study").axes
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.lines}
    assert lines == {"width": [[0.4, 40], [0.8, 45], [1.6, 52]], "compound": [[0.4, 40], [0.81, 47]]}
    assert labelled_points(ax) == [("x2", (0.8, 45.0)), ("x4", (1.6, 52.0)), ("x2", (0.81, 47.0))]


def test_the_study_and_baseline_search_files(tmp_path) -> None:
    study = [{**_study_row("baseline", 1, 0.4, 40), "variant": "b"},
             {**_study_row("width", 2, 0.8, 45), "variant": "w"}]
    paths = compare.write_study(study, tmp_path, "study")
    assert paths == [tmp_path / name for name in compare.STUDY_FILES]
    assert html_cells(paths[1].read_text()) == compare.table(study, compare.STUDY_COLUMNS)
    assert f"src='{paths[0].name}'" in paths[1].read_text()

    trials = [{"trial": "searched_abcdef12", "gmacs": 0.01, "seconds_per_image": 0.002, "reward": 0.5,
               "status": "trained"},
              {"trial": "searched_99", "gmacs": 0.02, "seconds_per_image": 0.003, "reward": None, "status": "trained"},
              {"trial": "searched_77", "status": "failed", "reason": "boom"}]
    by_gmacs, by_time = compare.baseline_search_figure(trials, "search").axes
    assert labelled_points(by_gmacs) == [("abcdef", (0.01, 0.5))] and labelled_points(by_time) == [
        ("abcdef", (0.002, 0.5))]  # only the scored trial
    assert by_gmacs.collections[0].get_offsets().tolist() == [[0.01, 0.5]]
    paths = compare.write_baseline_search(trials, tmp_path, "search")
    assert paths == [tmp_path / name for name in compare.BASELINE_FILES]
    assert list(csv.reader(io.StringIO(paths[2].read_text()))) == compare.table(trials, compare.BASELINE_COLUMNS)
