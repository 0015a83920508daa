"""Stage aggregate: one table of every backbone, ranked by test accuracy, each row compared with the best
on the same test images (paired bootstrap interval, McNemar's exact p), and the recommended backbone.

Writes metrics/summary.json, reports/comparison.{md,csv} and the charts reports/comparison.png and
reports/pareto.png (accuracy against single-image latency).
"""

from __future__ import annotations

from tlpipe.comparison import chart, comparison_table, markdown, pareto_chart, summary
from tlpipe.errors import stage_main
from tlpipe.files import atomic_path, write_json, write_text
from tlpipe.params import load_params
from tlpipe.paths import COMPARISON_DIR, SUMMARY_METRICS


@stage_main
def main() -> None:
    params = load_params()
    table = comparison_table(params)
    with atomic_path(COMPARISON_DIR / "comparison.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text(COMPARISON_DIR / "comparison.md", markdown(table, params))
    chart(table, COMPARISON_DIR / "comparison.png", params)
    pareto_chart(table, COMPARISON_DIR / "pareto.png")
    write_json(SUMMARY_METRICS, summary(table, params))
    print(markdown(table, params))


if __name__ == "__main__":
    main()
