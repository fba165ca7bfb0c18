"""The HTML/Markdown report and the analyze/report commands."""

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from dsacache.cli import main
from dsacache.errors import DsacacheError
from dsacache.report import collect, markdown_table, write_report
from dsacache.simulator import mrc
from dsacache.traces import open_trace

PLOTS = ("mrc", "overlap", "recency", "policies", "heatmap")


class _Tags(HTMLParser):
    """Checks that every opened element is closed in order (void elements aside)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(tag)
        else:
            self.stack.pop()


def _not_blank(png: bytes) -> float:
    """Standard deviation of the image's pixels (0 for a blank image)."""
    return float(imread(io.BytesIO(png), format="png")[..., :3].std())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from dsacache.tracer import SynthConfig, synthesize

    tmp = tmp_path_factory.mktemp("report")
    cfg = SynthConfig(layers=3, groups=2, requests=2, context=300, steps=6, k=40, seed=3,
                      model={"name": "tiny", "attention": "GQA", "kv_heads": 2, "head_dim": 64})  # fmt: skip
    trace = synthesize(cfg, tmp / "small.dsatrace")
    out = write_report(trace, tmp / "out" / "r.html", policies=["lru", "belady"],
                       command="dsacache report small.dsatrace")  # fmt: skip
    return trace, out


def test_html_is_self_contained_and_well_formed(report):
    _, out = report
    page = out.read_text()
    parser = _Tags()
    parser.feed(page)
    assert not parser.errors and not parser.stack
    assert len(parser.images) == len(PLOTS)
    for img in parser.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")  # nothing to fetch from elsewhere
        assert _not_blank(base64.b64decode(src.split(",", 1)[1])) > 0.02
    assert "dsacache report small.dsatrace" in page  # the command line
    for needle in ("calibrated: lru 28MiB", "SHARDS", "OPT (Belady)", "tiny", "Per layer"):
        assert needle in page
    assert 'src="http' not in page and 'href="http' not in page


def test_markdown_and_assets(report):
    _, out = report
    md = out.with_suffix(".md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(links) == len(PLOTS)
    for link in links:
        assert (out.parent / link).exists()
    for name in PLOTS:
        assert (out.parent / "r_files" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    rows = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("|")}
    assert {"lru", "belady"} <= rows


def test_report_numbers_are_the_analysis(report):
    trace, _ = report
    data = collect(open_trace(trace), policies=[], opt=False)
    table = data.mrc_table()
    assert {"L2 (50 MiB)", "effective L2 (28 MiB)", "reservation (16 MiB)"} <= set(table.columns)
    err = data.shards_error()
    assert set(err["granularity"]) == {"token", "line"}
    # the token curve is the exact curve of the KV gathers: at the footprint only cold misses
    token = data.curves["token"]["lru"]
    keys = np.unique(np.concatenate([k for k, _ in mrc.token_stream(open_trace(trace))]))
    assert token.hit_ratio(token.footprint_bytes)[0] == pytest.approx(1 - len(keys) / token.total)


def test_markdown_table_escapes():
    df = pd.DataFrame({"a": ["x|y", "z"], "b": [0.123456, np.nan]})
    lines = markdown_table(df).splitlines()
    assert len(lines) == 4 and [c.strip() for c in lines[0].split("|")[1:-1]] == ["a", "b"]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert cells == [["x\\|y", "0.1235"], ["z", ""]]


def test_bad_report_options(report, tmp_path):
    trace, _ = report
    with pytest.raises(DsacacheError, match=r"\.html"):
        write_report(trace, tmp_path / "r.txt", policies=[])
    with pytest.raises(DsacacheError, match="batch 7"):
        write_report(trace, tmp_path / "r.html", policies=[], batch=7)
    with pytest.raises(DsacacheError, match="sample rate"):
        write_report(trace, tmp_path / "r.html", policies=[], sample_rate=2)
    with pytest.raises(DsacacheError, match="GPU preset"):
        write_report(trace, tmp_path / "r.html", policies=[], gpu="tpu")


def test_cli_help_has_examples():
    for cmd in ("analyze", "report"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, cmd


def test_cli_analyze_and_report(report, tmp_path):
    trace, _ = report
    runner = CliRunner()
    res = runner.invoke(main, ["analyze", str(trace), "--out", str(tmp_path / "s"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "Jaccard" in res.output and "working set" in res.output
    assert pd.read_parquet(tmp_path / "s" / "layers.parquet").shape[0] == 6
    res = runner.invoke(main, ["analyze", str(trace), "--out", str(tmp_path / "c"),
                               "--format", "csv", "--quiet"])  # fmt: skip
    assert res.exit_code == 0 and (tmp_path / "c" / "working_set.csv").exists()
    res = runner.invoke(
        main, ["report", str(trace), "--out", str(tmp_path / "r.html"), "--no-replay", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").exists() and (tmp_path / "r.md").exists()
    for args in (
        ["analyze", str(tmp_path / "missing.dsatrace")],
        ["analyze", str(trace), "--windows", "2,x"],
        ["report", str(trace), "--policy", "nope"],
        ["report", str(trace), "--out", str(tmp_path / "r.pdf"), "--no-replay"],
    ):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.count("\n") == 1 and "error" in res.output


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_browser() is None, reason="no chromium/chromium-browser/google-chrome")
def test_renders_in_headless_chromium(report, tmp_path):
    _, out = report
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_browser(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1280,4000", out.resolve().as_uri()],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    img = imread(shot)[..., :3]
    assert img.std() > 0.02  # not blank
    # the plots' lines and bars are drawn in matplotlib's first colour (#1f77b4)
    blue = np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.08
    assert blue.sum() > 2000
