"""Tests for azdistill.evaluation (report, markdown, plot, publish): comparison ratios, JSON round trip, Markdown,
console lines, files, and the error bars (intervals and paired tests) they show."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from azdistill.evaluation.markdown import headline_lines, render_markdown
from azdistill.evaluation.plot import plot_report
from azdistill.evaluation.publish import write_report
from azdistill.evaluation.report import (
    ModelResult,
    PairedComparison,
    PromotionCheck,
    Report,
    comparison,
    error_bar_metrics,
    report_from_dict,
    report_to_dict,
)
from azdistill.tracking.tracker import NullTracker, log_evaluation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The expected `report.md` of the fixtures below, written by the code as it was before render_markdown was split.
GOLDEN = Path(__file__).parent / "golden"


def _model(role, name, parameters, peak, p50, p95, tput, metrics, disk=100.0, weights=200.0, n=80, ttft=None, per_token=None):
    return ModelResult(
        role=role,
        name=name,
        path=f"/models/{role}",
        parameters=parameters,
        size_on_disk_mb=disk,
        weights_memory_mb=weights,
        peak_memory_mb=peak,
        latency_p50_s=p50,
        latency_p95_s=p95,
        throughput_tokens_per_s=tput,
        n=n,
        metrics=metrics,
        ttft_p50_s=ttft,
        latency_per_token_p50_s=per_token,
    )


@pytest.fixture
def report() -> Report:
    # Round numbers so every expected ratio can be worked out by hand.
    return Report(
        pipeline="sentiment-demo",
        task="classification",
        data_version="v3",
        created="2025-05-01T12:00:00+00:00",
        primary_metric="accuracy",
        models=[
            _model("teacher", "Big (teacher)", 200_000_000, 2000.0, 0.8, 1.2, 100.0,
                   {"accuracy": 0.9, "parse_rate": 0.99}, disk=400.0, weights=800.0),
            _model("student", "Small (student)", 50_000_000, 500.0, 0.2, 0.3, 400.0,
                   {"accuracy": 0.81, "agreement": 0.9, "parse_rate": 0.97}, disk=100.0, weights=200.0),
            _model("baseline", "Small-Instruct (baseline)", 50_000_000, 510.0, 0.25, 0.4, 380.0,
                   {"accuracy": 0.5, "agreement": 0.125}),
            _model("reference_sft", "Small SFT | labels (reference)", 50_000_000, 505.0, 0.21, 0.31, 390.0,
                   {"accuracy": 0.85, "agreement": 0.8, "parse_rate": 1.0}),
        ],
        promote=True,
        checks=[
            PromotionCheck("agreement", 0.9, 0.8, ">=", True),
            PromotionCheck("quality_retained", 0.9, 0.85, ">=", True),
            PromotionCheck("latency_ratio", 0.25, 0.5, "<=", True),
            PromotionCheck("beats_baseline", 0.31, 0.0, ">", True),
        ],
        device="cpu (2 cores)",
        champion_metric="agreement",
        samples=[
            {"prompt": "Review: fast | cheap\nLabel?", "reference": "positive", "teacher": "positive",
             "student": "positive", "baseline": "It is\npositive"},
        ],
    )


@pytest.fixture
def freeform_report(report) -> Report:
    """A free-form task without references: no primary metric values, agreement only for some."""
    r = copy.deepcopy(report)
    r.task = "free_form"
    r.primary_metric = "rouge_l"
    r.models[0].metrics = {}
    r.models[1].metrics = {"agreement": 0.42}
    r.models[2].metrics = {"agreement": 0.1}
    r.models = r.models[:3]
    r.samples = [{"prompt": "Write a haiku", "reference": None, "teacher": "a\nb", "student": "c", "baseline": "d"}]
    return r


@pytest.fixture
def hosted_report(report) -> Report:
    """A hosted teacher priced per token, a student priced per serving hour, a failed check and wide samples."""
    r = copy.deepcopy(report)
    teacher = r.models[0]
    teacher.hosted = True
    teacher.parameters = 70_000_000_000  # declared
    teacher.size_on_disk_mb = teacher.weights_memory_mb = teacher.peak_memory_mb = float("nan")
    teacher.cost_per_1k_answers = 1.234
    r.models[1].cost_per_1k_answers = 0.0123
    r.models[1].n = 79
    r.models[1].metrics["bleu"] = 0.5
    r.promote = False
    r.checks[0] = PromotionCheck("agreement", 0.71, 0.8, ">=", False)
    r.samples = [
        {"prompt": "p" * 400, "reference": "r\r\nq", "teacher": "t", "student": None, "baseline": "b",
         "reference_sft": "s", "extra_column": "x"},
    ] * 7
    return r


@pytest.fixture
def interval_report(report) -> Report:
    """The report with 95% intervals on every quality figure of three rows and paired tests of the student against
    both baselines: one clearly significant, one not."""
    r = copy.deepcopy(report)
    r.models[0].intervals = {"accuracy": (0.8375, 0.9625), "parse_rate": (0.9625, 1.0)}
    r.models[1].intervals = {"accuracy": (0.725, 0.8875), "agreement": (0.8375, 0.9625), "parse_rate": (0.925, 1.0)}
    r.models[2].intervals = {"accuracy": (0.3875, 0.6125), "agreement": (0.05, 0.2)}
    r.comparisons = [
        PairedComparison("accuracy", "baseline", 0.81, 0.5, 0.31, 0.0001, True, "approximate randomization", 80),
        PairedComparison("agreement", "baseline", 0.9, 0.125, 0.775, 0.0001, True, "approximate randomization", 80),
        PairedComparison("accuracy", "reference_sft", 0.81, 0.85, -0.04, 0.2134, False, "approximate randomization", 80),
    ]
    return r


def test_comparison_ratios(report):
    comp = comparison(report)
    assert comp == pytest.approx(
        {
            "param_ratio": 0.25,  # 50M / 200M
            "latency_ratio": 0.25,  # 0.2 / 0.8
            "speedup": 4.0,  # 0.8 / 0.2
            "memory_ratio": 0.25,  # 500 / 2000
            "weights_memory_ratio": 0.25,  # 200 / 800
            "quality_retained": 0.9,  # 0.81 / 0.9
            "throughput_ratio": 4.0,  # 400 / 100
        }
    )


def test_comparison_guards_zero_and_missing(report):
    report.models[0].latency_p50_s = 0.0
    report.models[1].latency_p50_s = 0.0
    report.models[0].metrics["accuracy"] = 0.0
    comp = comparison(report)
    assert "latency_ratio" not in comp and "speedup" not in comp
    assert "quality_retained" not in comp
    assert comp["param_ratio"] == pytest.approx(0.25)

    del report.models[0].metrics["accuracy"]
    assert "quality_retained" not in comparison(report)
    assert comparison(
        Report("p", "t", "v", "now", "accuracy", [report.models[0]], False, [], "cpu")
    ) == {}


def test_json_round_trip(report):
    data = report_to_dict(report)
    assert data["comparison"] == comparison(report)
    text = json.dumps(data, allow_nan=False)
    assert report_from_dict(json.loads(text)) == report


def test_json_nan_becomes_null(report):
    report.models[2].metrics["bleu"] = float("nan")
    data = report_to_dict(report)
    assert data["models"][2]["metrics"]["bleu"] is None
    json.dumps(data, allow_nan=False)  # strict JSON must not raise
    back = report_from_dict(data)
    assert math.isnan(back.models[2].metrics["bleu"])


def test_from_dict_names_missing_key(report):
    data = report_to_dict(report)
    del data["models"][1]["peak_memory_mb"]
    with pytest.raises(ValueError, match=r"models\[1\].*peak_memory_mb"):
        report_from_dict(data)


def _table_rows(md: str) -> list[list[str]]:
    """Cells of the side-by-side table (the first table in the document)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Model |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_markdown_table(report):
    md = render_markdown(report)
    assert "sentiment-demo" in md and "classification" in md and "v3" in md
    assert "2025-05-01" in md and "cpu (2 cores)" in md
    assert "report.png" in md
    header = next(line for line in md.splitlines() if line.startswith("| Model |"))
    # Primary metric first, then agreement, then the rest sorted.
    assert header.index("Accuracy") < header.index("Agreement") < header.index("Parse rate")

    rows = _table_rows(md)
    assert len(rows) == 4  # one row per model
    teacher, student, baseline, ref = rows
    # No first-token or per-token figures (a report from before they were measured), no price: n/a.
    assert teacher[:10] == ["Big (teacher)", "200.0", "400.0", "2,000.0", "0.800", "1.200", "n/a", "n/a", "100.0", "n/a"]
    assert teacher[10:] == ["90.0%", "n/a", "99.0%"]  # the teacher has no agreement
    assert "Small (student)" in student[0]
    assert student[1] == "50.0" and student[10:] == ["81.0%", "90.0%", "97.0%"]
    assert baseline[10:] == ["50.0%", "12.5%", "n/a"]
    assert ref[0] == r"Small SFT \| labels (reference)"  # '|' escaped inside a cell


def test_markdown_headline_promotion_samples(report):
    md = render_markdown(report)
    assert "## Student vs teacher" in md
    # The headline says which latency it quotes.
    assert "75% less latency per response (p50), 75% less memory, 90% of the teacher's accuracy kept" in md
    assert "4.0x faster" in md
    assert "## Promotion: PROMOTE" in md
    assert ("Passed all 4 promotion checks: the registered student becomes champion if there is none yet or its "
            "agreement beats the current champion's; otherwise it stays a challenger.") in md
    assert "| agreement | 0.90 | >= 0.80 | pass |" in md
    assert r"Review: fast \| cheap<br>Label?" in md
    assert "It is<br>positive" in md

    report.promote = False
    report.checks[0] = PromotionCheck("agreement", 0.71, 0.8, ">=", False)
    md = render_markdown(report)
    assert "## Promotion: REJECTED" in md and "KEEP CURRENT" not in md
    assert ("Failed the promotion checks: agreement 0.71 < 0.8. The registered student is tagged rejected and does "
            "not become champion; the current champion, if any, stays.") in md
    assert "| agreement | 0.71 | >= 0.80 | **FAIL** |" in md


@pytest.mark.parametrize("fixture", ["report", "freeform_report", "hosted_report", "interval_report"])
def test_markdown_whole_text_is_unchanged(fixture, request):
    """Every line of `report.md`, byte for byte, against the text kept in tests/golden/: the checks above look at
    parts of it, this one catches any other change a refactor might bring."""
    md = render_markdown(request.getfixturevalue(fixture))
    assert md == (GOLDEN / f"{fixture}.md").read_bytes().decode("utf-8")


def test_markdown_bleu_one_decimal(report):
    report.models[0].metrics["bleu"] = 31.25
    report.models[1].metrics["bleu"] = 0.5  # bleu is on a 0-100 scale even when small
    md = render_markdown(report)
    rows = _table_rows(md)
    header = next(line for line in md.splitlines() if line.startswith("| Model |"))
    col = [c.strip() for c in header.strip("|").split(" | ")].index("BLEU")
    assert [r[col] for r in rows] == ["31.2", "0.5", "n/a", "n/a"]


def test_headline_lines(report):
    lines = headline_lines(report)
    assert 3 <= len(lines) <= 6
    text = "\n".join(lines)
    assert "student: 50.0M params (25% of teacher), 4.0x faster per response (p50 0.20 s vs 0.80 s)" in text
    assert "agreement with teacher: 90.0% (baseline 12.5%)" in text
    assert "accuracy: student 81.0%, teacher 90.0%, baseline 50.0%" in text
    assert lines[-1] == "promotion: PROMOTE: becomes champion unless the current champion's agreement is as high (all 4 checks passed)"

    report.promote = False
    report.checks[0] = PromotionCheck("agreement", 0.71, 0.8, ">=", False)
    assert headline_lines(report)[-1] == "promotion: REJECTED: failed the promotion checks: agreement 0.71 < 0.8"


def test_write_report(report, tmp_path):
    out = tmp_path / "nested" / "eval"
    paths = write_report(report, out)
    assert set(paths) == {"json", "markdown", "html", "plot"}
    assert paths["json"] == out / "report.json"
    assert paths["markdown"] == out / "report.md"
    assert paths["html"] == out / "report.html"
    assert paths["plot"] == out / "report.png"
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    data = json.loads(paths["json"].read_text())
    assert data["comparison"]["speedup"] == pytest.approx(4.0)
    assert paths["markdown"].read_text().startswith("# ")
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "report.png"]


def test_write_report_replaces_existing(report, tmp_path):
    write_report(report, tmp_path)
    report.pipeline = "second-run"
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["pipeline"] == "second-run"
    assert len(list(tmp_path.iterdir())) == 4


def test_failed_plot_leaves_no_partial_file(report, tmp_path, monkeypatch):
    import azdistill.evaluation.plot as mod

    target = tmp_path / "report.png"
    target.write_bytes(b"old")

    def boom(_report):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(mod, "_build_figure", boom)
    with pytest.raises(RuntimeError):
        plot_report(report, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_freeform_report_without_reference_metrics_renders(freeform_report, tmp_path):
    md = render_markdown(freeform_report)
    rows = _table_rows(md)
    assert len(rows) == 3
    assert rows[0][-1] == "n/a" and rows[1][-1] == "42.0%"  # agreement is the only metric column
    assert "ROUGE-L" not in md.split("## Student vs teacher")[0]
    assert "of the teacher's" in md  # ratios still reported without a quality figure
    assert "kept" not in md
    assert "| Prompt | Teacher | Student | Baseline |" in md  # no reference column

    lines = headline_lines(freeform_report)
    assert any("faster per response" in line for line in lines)
    assert any(line.startswith("agreement with teacher: 42.0%") for line in lines)

    paths = write_report(freeform_report, tmp_path)
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert report_from_dict(json.loads(paths["json"].read_text())) == freeform_report


def test_report_without_any_metrics_renders(freeform_report, tmp_path):
    for m in freeform_report.models:
        m.metrics = {}
    freeform_report.checks = []
    freeform_report.samples = []
    md = render_markdown(freeform_report)
    assert len(_table_rows(md)) == 3
    assert "No promotion checks" in md
    assert headline_lines(freeform_report)[-1] == (
        "promotion: PROMOTE: becomes champion unless the current champion's agreement is as high (no checks configured)")
    assert write_report(freeform_report, tmp_path)["plot"].read_bytes()[:8] == PNG_MAGIC


# --- error bars: intervals and paired tests --------------------------------------------------------


def test_markdown_shows_intervals_in_the_quality_cells(interval_report):
    md = render_markdown(interval_report)
    teacher, student, baseline, reference = _table_rows(md)
    assert student[10:] == ["81.0% (72.5-88.8)", "90.0% (83.8-96.2)", "97.0% (92.5-100.0)"]
    assert teacher[10:] == ["90.0% (83.8-96.2)", "n/a", "99.0% (96.2-100.0)"]
    assert baseline[10:] == ["50.0% (38.8-61.3)", "12.5% (5.0-20.0)", "n/a"]
    assert reference[10:] == ["85.0%", "80.0%", "100.0%"]  # no intervals: the figure alone
    assert "In brackets: the 95% bootstrap confidence interval over the held-out items." in md


def test_markdown_says_whether_each_difference_is_real(interval_report):
    md = render_markdown(interval_report)
    section = md.split("## Is the difference real?")[1].split("##")[0]
    assert (
        "- student vs baseline: accuracy 81.0% vs 50.0%, +31.0 points, p < 0.001 "
        "(paired approximate randomization, 80 items): significant"
    ) in section
    assert (
        "- student vs reference sft: accuracy 81.0% vs 85.0%, -4.0 points, p = 0.21 "
        "(paired approximate randomization, 80 items): not significant"
    ) in section
    assert "agreement 90.0% vs 12.5%, +77.5 points" in section
    # Without tests (no baseline, or a report written before them) there is no such section.
    assert "Is the difference real?" not in render_markdown(Report(**{**vars(interval_report), "comparisons": []}))


def test_headline_lines_carry_the_agreement_interval_and_the_tests(interval_report):
    lines = headline_lines(interval_report)
    assert "agreement with teacher: 90.0% [95% interval 83.8-96.2] (baseline 12.5%)" in lines
    assert "student on accuracy: vs baseline +31.0 points (p < 0.001, significant); " \
        "vs reference sft -4.0 points (p = 0.21, not significant)" in lines
    assert len(lines) <= 7


def test_intervals_and_comparisons_round_trip(interval_report):
    text = json.dumps(report_to_dict(interval_report), allow_nan=False)
    data = json.loads(text)
    assert data["models"][1]["intervals"]["accuracy"] == [0.725, 0.8875]
    assert data["comparisons"][2]["significant"] is False
    assert report_from_dict(data) == interval_report


def test_report_json_written_before_error_bars_still_loads(interval_report):
    data = report_to_dict(interval_report)
    del data["comparisons"]
    for model in data["models"]:
        del model["intervals"]
    old = report_from_dict(data)
    assert old.comparisons == [] and all(m.intervals == {} for m in old.models)
    assert "Is the difference real?" not in render_markdown(old)


def test_malformed_comparison_is_named(interval_report):
    data = report_to_dict(interval_report)
    del data["comparisons"][1]["p_value"]
    with pytest.raises(ValueError, match=r"comparisons\[1\].*p_value"):
        report_from_dict(data)


def test_error_bars_are_logged_as_student_metrics(interval_report, tmp_path):
    assert error_bar_metrics(interval_report) == {
        "student_accuracy_ci_low": 0.725,
        "student_accuracy_ci_high": 0.8875,
        "student_agreement_ci_low": 0.8375,
        "student_agreement_ci_high": 0.9625,
        "student_parse_rate_ci_low": 0.925,
        "student_parse_rate_ci_high": 1.0,
        "student_vs_baseline_accuracy_p_value": 0.0001,
        "student_vs_baseline_agreement_p_value": 0.0001,
        "student_vs_reference_sft_accuracy_p_value": 0.2134,
    }

    class Recording(NullTracker):
        logged: dict[str, float] = {}

        def log_metrics(self, metrics, step=None):
            self.logged.update(metrics)

    tracker = Recording()
    log_evaluation(tracker, interval_report, {})
    assert tracker.logged["student_vs_reference_sft_accuracy_p_value"] == 0.2134
    assert tracker.logged["student_accuracy"] == 0.81  # the existing names are unchanged


# --- latency as users feel it: time to first token and per output token ----------------------------------------


@pytest.fixture
def felt_latency_report(report) -> Report:
    """Every row timed to its first token and per output token. The baseline rambles: slower per response than the
    student, yet faster per token."""
    r = copy.deepcopy(report)
    for model, ttft, per_token in zip(r.models, (0.3, 0.05, 0.06, 0.05), (0.02, 0.01, 0.002, 0.01)):
        model.ttft_p50_s, model.latency_per_token_p50_s = ttft, per_token
    return r


def test_first_token_and_per_token_ratios(felt_latency_report):
    comp = comparison(felt_latency_report)
    assert comp["ttft_ratio"] == pytest.approx(0.05 / 0.3)
    assert comp["latency_per_token_ratio"] == pytest.approx(0.5)
    assert comp["latency_ratio"] == pytest.approx(0.25)  # per response, as before


def test_markdown_shows_first_token_and_per_token_latency(felt_latency_report):
    md = render_markdown(felt_latency_report)
    header_line = next(line for line in md.splitlines() if line.startswith("| Model |"))
    header = [cell.strip() for cell in header_line.strip("|").split(" | ")]
    assert header[4:8] == ["Latency per response p50 (s)", "Latency per response p95 (s)", "Time to first token p50 (s)",
                           "Latency per output token p50 (s)"]
    teacher, student, baseline, _ = _table_rows(md)
    assert (teacher[6], teacher[7]) == ("0.300", "0.0200")
    assert (student[6], student[7]) == ("0.050", "0.0100")
    assert (baseline[4], baseline[7]) == ("0.250", "0.0020")  # slower per response than the student, faster per token
    assert "- Time to first token (p50): 6.0x faster than the teacher" in md
    assert "- Latency per output token (p50): 2.0x faster than the teacher" in md
    assert "per output token (a response's seconds over the tokens it generated" in md
    assert "not measured" not in md  # every row has its figures: no gap to explain


def test_headline_lines_quote_first_token_and_per_token_latency(felt_latency_report, report):
    lines = headline_lines(felt_latency_report)
    assert lines[0].endswith("4.0x faster per response (p50 0.20 s vs 0.80 s)")
    assert "first token 0.050 s vs 0.300 s, per output token 0.0100 s vs 0.0200 s (p50, student vs teacher)" in lines
    assert not any("first token" in line for line in headline_lines(report))  # not measured: no line


def test_a_hosted_teachers_first_token_is_not_faked(felt_latency_report):
    """A hosted teacher answers through a client that does not stream: its time to first token stays n/a, and the
    report says why, while its per-token latency (seconds over the tokens its endpoint counted) is shown."""
    teacher = felt_latency_report.models[0]
    teacher.hosted, teacher.ttft_p50_s = True, None
    md = render_markdown(felt_latency_report)
    row = _table_rows(md)[0]
    assert (row[6], row[7]) == ("n/a", "0.0200")
    assert "A hosted model's time to first token is not measured: the endpoint client asks without streaming" in md
    assert "Time to first token (p50)" not in md  # no ratio against a figure that was not measured
    assert "first token 0.050 s vs n/a, per output token 0.0100 s vs 0.0200 s (p50, student vs teacher)" in headline_lines(
        felt_latency_report)


def test_a_label_scoring_teacher_has_a_first_token_but_no_per_token_latency(felt_latency_report):
    teacher = felt_latency_report.models[0]
    teacher.ttft_p50_s, teacher.latency_per_token_p50_s = teacher.latency_p50_s, None
    md = render_markdown(felt_latency_report)
    assert "A teacher that scores the labels answers in one piece" in md
    assert "Latency per output token (p50)" not in md


def test_first_token_figures_round_trip_and_old_reports_load(felt_latency_report):
    data = json.loads(json.dumps(report_to_dict(felt_latency_report), allow_nan=False))
    assert data["models"][1]["ttft_p50_s"] == 0.05 and data["models"][1]["latency_per_token_p50_s"] == 0.01
    assert data["comparison"]["latency_per_token_ratio"] == pytest.approx(0.5)
    assert report_from_dict(data) == felt_latency_report
    for model in data["models"]:
        del model["ttft_p50_s"], model["latency_per_token_p50_s"]
    del data["champion_metric"]
    old = report_from_dict(data)
    assert all(m.ttft_p50_s is None and m.latency_per_token_p50_s is None for m in old.models)
    assert old.champion_metric is None
    assert headline_lines(old)[-1] == (
        "promotion: PROMOTE: becomes champion unless the current champion's evaluation.promotion.champion_metric is as "
        "high (all 4 checks passed)")


def test_the_latency_panel_draws_the_first_token_beside_each_response(felt_latency_report, report, tmp_path):
    from azdistill.evaluation.plot import _measurement_panels

    title, _, values, _, first_token = _measurement_panels(felt_latency_report)[0]
    assert first_token == ("Latency p50: response (solid), first token (hatched)", [0.3, 0.05, 0.06, 0.05])
    assert _measurement_panels(report)[0][4] is None  # nothing to draw beside the responses
    assert plot_report(felt_latency_report, tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC


# --- report.html: what MLflow's artifact viewer shows ------------------------------------------------------------


class _Page:
    """What a browser would find in an HTML page: its tags with their attributes, and each table's header cells."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.tags: list[tuple[str, dict]] = []
        self.headers: list[list[str]] = []
        page = self

        class Parser(HTMLParser):
            cell: list[str] | None = None

            def handle_starttag(self, tag, attrs):
                page.tags.append((tag, dict(attrs)))
                if tag == "thead":
                    page.headers.append([])
                if tag == "th":
                    self.cell = []

            def handle_endtag(self, tag):
                if tag == "th" and self.cell is not None:
                    page.headers[-1].append("".join(self.cell).strip())
                    self.cell = None

            def handle_data(self, data):
                if self.cell is not None:
                    self.cell.append(data)

        Parser().feed(text)

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def test_report_html_is_one_self_contained_page(felt_latency_report, tmp_path):
    import base64

    felt_latency_report.samples[0]["student"] = "<script>alert('hi')</script> a\nb"
    paths = write_report(felt_latency_report, tmp_path)
    text = paths["html"].read_text(encoding="utf-8")
    page = _Page(text)
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    # The plot is in the page, byte for byte: the artifact viewer's sandboxed iframe cannot fetch report.png.
    (image,) = page.all("img")
    prefix = "data:image/png;base64,"
    assert image["src"].startswith(prefix)
    assert base64.b64decode(image["src"][len(prefix):]) == paths["plot"].read_bytes()
    # Nothing from outside: no script, no stylesheet link, no address to load.
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    assert "http://" not in text and "https://" not in text
    # A model's answer is text, never markup; the Markdown's own line breaks in cells are kept.
    assert "&lt;script&gt;alert('hi')&lt;/script&gt; a<br>b" in text
    assert "It is<br>positive" in text
    assert len(page.all("br")) >= 2


def test_report_html_tables_have_their_full_headers(felt_latency_report, tmp_path):
    paths = write_report(felt_latency_report, tmp_path)
    page = _Page(paths["html"].read_text(encoding="utf-8"))
    md = paths["markdown"].read_text(encoding="utf-8")
    md_headers = [[cell.strip().replace("\\|", "|") for cell in line.strip("|").split(" | ")]
                  for line, below in zip(md.splitlines(), md.splitlines()[1:]) if line.startswith("| ") and "---" in below]
    assert page.headers == md_headers  # every table, every header cell, word for word
    assert "Latency per output token p50 (s)" in page.headers[0]
    assert "## " not in paths["html"].read_text()  # headings became headings
    assert [h for h in ("h1", "h2") if page.all(h)] == ["h1", "h2"]
