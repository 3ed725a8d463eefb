"""The family side by side: top-1 against parameters and against GMACs (the papers' Figures 1 and 5), training
time per variant, and the table, as the files a family's parent MLflow run holds (PNG, HTML, CSV) and as the
markdown table of the Prefect artifact.

Rows are the family flow's: a member's TrainResult fields with "status" "trained", or "variant", "status"
"failed" and "reason". Plots and figures use the trained ones; the tables list every member.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict

from models.summary import aligned_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Status = Literal["trained", "failed"]  # a row's status (a failed row has a "reason")
TRAINED: Final = "trained"
FAILED: Final = "failed"


class RowStatus(TypedDict, total=False):
    """The part every row shares (a family member's, a search trial's): how it ended and, if it failed, why."""

    status: Status
    reason: str


def row_status(error: BaseException | str | None) -> RowStatus:
    """Trained (no error), or failed with the error's first line as the reason (its type's name if it has none)."""
    if error is None:
        return {"status": TRAINED}
    lines = str(error).strip().splitlines()
    fallback = type(error).__name__ if isinstance(error, BaseException) else FAILED
    return {"status": FAILED, "reason": lines[0] if lines else fallback}


# (header, row key, format) of every table; the numbers the plots use are among them.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("variant", "variant", "{}"),
    ("params (M)", "params", "{:.3f}"),
    ("GMACs", "gmacs", "{:.4f}"),
    ("train px", "train_resolution", "{}"),
    ("eval px", "eval_resolution", "{}"),
    ("minival top-1", "minival_top1", "{:.2f}"),
    ("val top-1", "val_top1", "{:.2f}"),
    ("val top-5", "val_top5", "{:.2f}"),
    ("wall-clock h", "wall_clock_hours", "{:.3f}"),
    ("GPU-h", "gpu_hours", "{:.3f}"),
    ("version", "version", "{}"),
    ("champion", "champion", "{}"),
)
FILES = ("comparison.png", "comparison.html", "comparison.csv")
# The nightly's before/after of each variant's champion (rows: `champion_rows`); val top-1 is there to report.
CHAMPION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("variant", "variant", "{}"),
    ("started from", "init_from", "{}"),
    ("new version", "version", "{}"),
    ("its minival top-1", "promotion_top1", "{:.2f}"),
    ("champion before", "champion_before", "{}"),
    ("champion before on that minival", "champion_before_top1", "{:.2f}"),
    ("champion now", "champion_after", "{}"),
    ("val top-1 (report)", "val_top1", "{:.2f}"),
    ("decision", "promotion", "{}"),
)
CHAMPION_FILES = ("champions.html", "champions.csv")


def _shown(row: dict[str, Any], key: str) -> Any:
    """A row's value as tables and plots show it: parameters in millions."""
    return row[key] / 1e6 if key == "params" else row[key]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if row.get(key) is None:
        return "-" if key not in row else "none"
    return fmt.format(_shown(row, key))


Columns = Sequence[tuple[str, str, str]]


def table(rows: Sequence[dict[str, Any]], columns: Columns = COLUMNS) -> list[list[str]]:
    """Header, then one row of cells per member; the last column is its status (and why it failed)."""
    status = [r["status"] if r["status"] == TRAINED else f"{r['status']}: {r.get('reason', '')}" for r in rows]
    return [[h for h, _, _ in columns] + ["status"]] + [
        [_cell(r, k, f) for _, k, f in columns] + [s] for r, s in zip(rows, status)
    ]


def to_text(rows: Sequence[dict[str, Any]], columns: Columns = COLUMNS) -> str:
    """The table in aligned columns, for a console or a log."""
    return aligned_text(table(rows, columns))


def to_csv(rows: Sequence[dict[str, Any]], columns: Columns = COLUMNS) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(table(rows, columns))
    return out.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]], columns: Columns = COLUMNS) -> str:
    return markdown_table(table(rows, columns))


def markdown_table(cells: Sequence[Sequence[str]]) -> str:
    """Rows of cells, the header first, as a markdown table (a `|` in a cell escaped). The one markdown-table
    layout of the project (the family's summary, the nightly's promotions, the transfer table)."""
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join([lines[0], "|" + "---|" * len(cells[0]), *lines[1:]]) + "\n"


def to_html(
    rows: Sequence[dict[str, Any]], title: str, image: str | None = FILES[0], columns: Columns = COLUMNS
) -> str:
    cells = table(rows, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    figure = f"<img src='{html.escape(image)}' alt='top-1 against params and GMACs'>" if image else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>"
        f"<h2>{html.escape(title)}</h2>{figure}"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></body></html>\n"
    )


def champion_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Family rows with "champion_after": the new version when it took `champion`, else the champion before (a
    failed member keeps whatever champion it had, unknown here)."""

    def after(r: dict[str, Any]) -> Any:
        return r["version"] if r.get("champion") else r.get("champion_before")

    return [{**r, "champion_after": after(r)} if r["status"] == TRAINED else dict(r) for r in rows]


def write_champions(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """The before/after of each champion (`CHAMPION_FILES`) in `out_dir`."""
    return write_table(champion_rows(rows), out_dir, title, CHAMPION_COLUMNS, CHAMPION_FILES)


def _figure(width: float, height: float) -> Figure:
    """An empty figure of its own: not pyplot's (no display, no global list of open figures to close)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def family_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """Three panels: val top-1 against parameters and against GMACs (log-scaled x, each point labelled with its
    variant), and wall-clock hours per variant."""
    trained = [r for r in rows if r["status"] == TRAINED]
    fig = _figure(16, 4.8)
    axes = fig.subplots(1, 3)
    for ax, key, label in ((axes[0], "params", "parameters (M)"), (axes[1], "gmacs", "GMACs")):
        shown = sorted((r for r in trained if r.get(key, 0) > 0), key=lambda r: r[key])  # a log axis: > 0 only
        xs, ys = [_shown(r, key) for r in shown], [r["val_top1"] for r in shown]
        ax.plot(xs, ys, "o-", color="tab:red")
        for r, x, y in zip(shown, xs, ys):
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if xs:
            ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(True, which="both", alpha=0.3)
    names = [r["variant"] for r in trained]
    axes[2].bar(range(len(names)), [r["wall_clock_hours"] for r in trained], color="tab:blue")
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[2].set_ylabel("wall-clock hours")
    axes[2].set_title("training time")
    axes[0].set_title("top-1 against parameters")
    axes[1].set_title("top-1 against GMACs")
    fig.suptitle(title)
    return fig


def write_comparison(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """The PNG, HTML and CSV files of the comparison in `out_dir`; their paths."""
    return write_figure_and_table(family_figure(rows, title), rows, out_dir, title, COLUMNS, FILES)


# A scaling search's trials (rows: `pipelines.search.trials` outcomes as the search flow writes them).
SEARCH_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("trial", "trial", "{}"),
    ("alpha", "alpha", "{:g}"),
    ("beta", "beta", "{:g}"),
    ("gamma", "gamma", "{:g}"),
    ("a*b^2*g^2", "flops_factor", "{:.3f}"),
    ("variant", "variant", "{}"),
    ("GMACs", "gmacs", "{:.4f}"),
    ("epochs run", "epochs_run", "{}"),
    ("stopped by ASHA", "stopped_early", "{}"),
    ("best minival top-1", "best_minival_top1", "{:.2f}"),
    ("its minival loss", "best_minival_loss", "{:.4f}"),
)
SEARCH_FILES = ("trials.html", "trials.csv")
# The scaling study's members: one row per method and FLOPs target, the baseline first.
STUDY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "{}"),
    ("target x", "target", "{:g}"),
    ("GMACs x", "gmacs_ratio", "{:.2f}"),
    ("variant", "variant", "{}"),
    ("depth x", "depth_factor", "{:.3f}"),
    ("width x", "width_factor", "{:.3f}"),
    ("resolution x", "resolution_factor", "{:.3f}"),
    ("params (M)", "params", "{:.3f}"),
    ("GMACs", "gmacs", "{:.4f}"),
    ("eval px", "eval_resolution", "{}"),
    ("best epoch", "best_epoch", "{}"),
    ("minival top-1", "minival_top1", "{:.2f}"),
    ("val top-1", "val_top1", "{:.2f}"),
)
STUDY_FILES = ("scaling_study.png", "scaling_study.html", "scaling_study.csv")


def write_table(
    rows: Sequence[dict[str, Any]],
    out_dir: Path,
    title: str,
    columns: Columns,
    names: Sequence[str],
    image: str | None = None,
) -> list[Path]:
    """An HTML page and a CSV of `rows` in `out_dir`, named `names` (page, sheet); their paths."""
    page, sheet = (out_dir / name for name in names)
    page.write_text(to_html(rows, title, image=image, columns=columns))
    sheet.write_text(to_csv(rows, columns))
    return [page, sheet]


def write_figure_and_table(
    figure: Figure, rows: Sequence[dict[str, Any]], out_dir: Path, title: str, columns: Columns, names: Sequence[str]
) -> list[Path]:
    """`figure` as a PNG, then the page that shows it and the CSV (`write_table`), in `out_dir`, named `names`
    (image, page, sheet); their paths."""
    png = out_dir / names[0]
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    return [png, *write_table(rows, out_dir, title, columns, names[1:], image=png.name)]


def study_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """The paper's Figure 8 setting: val top-1 against GMACs, one line per scaling method, each starting at the
    baseline; each point labelled with its FLOPs target."""
    trained = [r for r in rows if r["status"] == TRAINED]
    baseline = [r for r in trained if r["method"] == "baseline"]
    fig = _figure(7.5, 5)
    ax = fig.subplots()
    for method in dict.fromkeys(r["method"] for r in trained if r["method"] != "baseline"):
        shown = baseline + sorted((r for r in trained if r["method"] == method), key=lambda r: r["gmacs"])
        (line,) = ax.plot(
            [r["gmacs"] for r in shown],
            [r["val_top1"] for r in shown],
            "o-",
            label=method,
            linewidth=2.5 if method == "compound" else 1.5,
        )
        for r in shown[len(baseline) :]:
            ax.annotate(
                f"x{r['target']:g}",
                (r["gmacs"], r["val_top1"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
                color=line.get_color(),
            )
    ax.set_xlabel("GMACs (at the eval resolution)")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="scaled by")
    ax.set_title(title, fontsize=10)
    return fig


def write_study(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    return write_figure_and_table(study_figure(rows, title), rows, out_dir, title, STUDY_COLUMNS, STUDY_FILES)


# A baseline search's trials: one row per sampled table.
BASELINE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("trial", "trial", "{}"),
    ("round", "generation", "{}"),
    ("params (M)", "params", "{:.3f}"),
    ("GMACs", "gmacs", "{:.4f}"),
    ("s / image", "seconds_per_image", "{:.5f}"),
    ("epochs run", "epochs_run", "{}"),
    ("stopped by ASHA", "stopped_early", "{}"),
    ("best minival top-1", "best_minival_top1", "{:.2f}"),
    ("reward", "reward", "{:.4f}"),
    ("rows", "rows", "{}"),
)
BASELINE_FILES = ("baselines.png", "baselines.html", "baselines.csv")


def baseline_search_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """Reward against GMACs and against the measured training time per image, one point per trial."""
    scored = [r for r in rows if r["status"] == TRAINED and r.get("reward") is not None]
    fig = _figure(12, 4.8)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "gmacs", "GMACs"), (axes[1], "seconds_per_image", "training s / image")):
        ax.scatter([r[key] for r in scored], [r["reward"] for r in scored], color="tab:red")
        for r in scored:
            ax.annotate(
                r["trial"].removeprefix("searched_")[:6],
                (r[key], r["reward"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        ax.set_xlabel(label)
        ax.set_ylabel("reward")
        ax.grid(True, alpha=0.3)
    axes[0].set_title("reward against GMACs")
    axes[1].set_title("reward against training-step time")
    fig.suptitle(title, fontsize=10)
    return fig


def write_baseline_search(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    return write_figure_and_table(
        baseline_search_figure(rows, title), rows, out_dir, title, BASELINE_COLUMNS, BASELINE_FILES
    )
