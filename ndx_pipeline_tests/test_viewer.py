"""The static neuron viewer: files, escaping, the pages over variants, and a real headless Chromium opening them
from disk."""

from __future__ import annotations

import ast
import html
import importlib.util
import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ndx_pipeline.core.contract import DICTIONARY_LATENT
from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.models import BUNDLED_MODEL, BUNDLED_MODEL_NOTE
from ndx_pipeline.core.storage import asset_path, viewer_dir, write_parquet_atomic
from ndx_pipeline.reports import viewer as viewer_module
from ndx_pipeline.reports.viewer import (
    fmt_score,
    neuron_page_path,
    script_json,
    static_text,
    write_index,
    write_layer_pages,
    write_variants_index,
    write_viewer,
)


def _load_fixture_builder():
    spec = importlib.util.spec_from_file_location("ndx_lineage_fixture", Path(__file__).with_name("test_lineage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURE = _load_fixture_builder()
V = FIXTURE.V  # the variant the fixture store holds; OTHER, a copy of its layer 0 whose scores are 0.1 lower
OTHER, SHIFT = "other", -0.1
# Text that would run if it were ever inserted as HTML: in an explanation and in a document's source.
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> &amp; &lt;b&gt;'
RUNS = {0: {"activation_records": {"run_id": "run-aaaa", "code_version": "cv1", "data_version": "dv1"},
            "scores": {"run_id": "run-bbbb", "code_version": "cv2", "data_version": "dv2"}}}


def _hostile_store(root: Path) -> Path:
    storage = FIXTURE.build_store(root)
    for asset in ("explanations", "scores"):
        path = asset_path(storage, asset, 0, V)
        frame = pl.read_parquet(path).with_columns(
            pl.when(pl.col("neuron") == 3).then(pl.lit("HTML tags " + PAYLOAD)).otherwise(pl.col("explanation"))
            .alias("explanation"))
        write_parquet_atomic(frame, path)
    corpus_path = asset_path(storage, "corpus")
    corpus = pl.read_parquet(corpus_path).with_columns(pl.lit(PAYLOAD).alias("source"))
    write_parquet_atomic(corpus, corpus_path)
    return storage


@pytest.fixture(scope="module")
def viewer(tmp_path_factory) -> Path:
    """The viewer of variant V (its index), beside that of OTHER; V's pages written again after OTHER's, so that
    each links to the other's."""
    storage = _hostile_store(tmp_path_factory.mktemp("viewer"))
    FIXTURE.copy_variant(storage, V, OTHER, layers=[0], score_shift=SHIFT)
    write_viewer(storage, runs=RUNS, variant=V)
    write_viewer(storage, variant=OTHER)
    return write_viewer(storage, runs=RUNS, variant=V)


def _storage(viewer: Path) -> Path:
    return viewer.parent.parent.parent


def test_writes_an_index_and_a_page_per_scored_neuron(viewer):
    out = viewer.parent
    assert viewer.name == "index.html" and out == viewer_dir(_storage(viewer), V)
    assert out.parent == viewer_dir(_storage(viewer)) and out.parent.name == "neuron_viewer"
    pages = sorted(str(p.relative_to(out)) for p in out.rglob("*.html"))
    assert pages == ["0/3.html", "0/7.html", "1/5.html", "1/9.html", "index.html"]
    everything = sorted(str(p.relative_to(out.parent)) for p in out.parent.rglob("*.html"))
    assert everything == ["compare.html", "index.html", *(f"{V}/{p}" for p in pages),
                          f"{OTHER}/0/3.html", f"{OTHER}/0/7.html", f"{OTHER}/index.html"]
    assert not [p for p in out.parent.rglob("*") if p.name.startswith(".")], "temporary files were left behind"
    index = viewer.read_text()
    for page in pages[:-1]:
        assert f'href="{page}"' in index
    assert "baseline lookup" in index and "score top" in index and "score random" in index


def test_pages_are_self_contained(viewer):
    for page in viewer.parent.parent.rglob("*.html"):
        text = page.read_text()
        assert "default-src 'none'" in text  # the CSP forbids every fetch
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text), page
        assert "@import" not in text and "url(" not in text
        assert not re.search(r"<(link|iframe|object|embed|img)\b", text), page


def test_pages_inline_the_static_files_and_link_only_to_each_other(viewer):
    out = viewer.parent.parent
    for page in out.rglob("*.html"):
        text = page.read_text()
        assert static_text("viewer.css") in text and static_text("tooltip.js") in text
        assert (static_text("index.js") in text) == (page in (viewer, out / OTHER / "index.html"))
        assert not re.search(r"<script\b[^>]*\bsrc\s*=", text), page
        for ref in re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", text):
            assert not re.match(r"[a-z][a-z0-9+.-]*:|//", ref, re.I), (page, ref)  # no scheme: nothing external
            assert (page.parent / ref).resolve().is_file(), (page, ref)


def test_hostile_text_is_escaped(viewer):
    page = (viewer.parent / "0" / "3.html").read_text()
    # Our two script elements only; the payload's tags appear escaped.
    assert len(re.findall(r"<script\b", page)) == 2
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    assert "&amp;amp;" in page  # the entity in the text is shown as typed
    data = re.search(r'<script type="application/json" id="lineage-json">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and ">" not in data
    lineage = json.loads(data)
    assert lineage["explanation"]["explanation"] == "HTML tags " + PAYLOAD
    assert lineage["runs"]["activation_records"]["run_id"] == "run-aaaa"
    assert "run-aaaa" in page and "cv2" in page
    index = viewer.read_text()
    assert len(re.findall(r"<script\b", index)) == 1 and "&lt;img src=x" in index


class _TokenText(HTMLParser):
    """The text of each heatmap token (`.t` span) inside the element with id `within`, one list per `.ex` excerpt."""

    def __init__(self, within: str):
        super().__init__(convert_charrefs=True)
        self.within, self.depth, self.excerpts, self.token = within, 0, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth or attrs.get("id") == self.within:
            self.depth += 1
            if attrs.get("class") == "ex":
                self.excerpts.append([])
            elif attrs.get("class") == "t":
                self.token = ""

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1
            if tag == "span" and self.token is not None and not self.token.endswith(("↵", "∅")):
                self.excerpts[-1].append(self.token)
                self.token = None

    def handle_data(self, data):
        if self.token is not None:
            self.token += data


def test_corpus_markup_in_tokens_is_shown_as_text(viewer):
    """Tokens holding `<script>alert(1)</script>`, `&` and `&amp;` reach the page as text: escaped in the HTML,
    equal to the stored tokens once the browser decodes them, and never an element."""
    page = (viewer.parent / "0" / "3.html").read_text()
    parser = _TokenText("top")
    parser.feed(page)
    records = pl.read_parquet(asset_path(_storage(viewer), "activation_records", 0, V))
    top = records.filter((pl.col("neuron") == 3) & (pl.col("kind") == "top")).sort("rank")
    expected = [[t.replace("\n", "↵\n") if t else "∅" for t in tokens] for tokens in top["tokens"].to_list()]
    assert parser.excerpts == expected
    shown = [t.strip() for tokens in parser.excerpts for t in tokens]
    assert "<script>" in shown and "</script>" in shown and "&" in shown
    assert ">&lt;/script&gt;</span>" in page and "> &amp;</span>" in page
    assert "Use &lt;script&gt;alert(" in page  # the document's text around an excerpt
    assert "The entity &amp;amp; stands" in page  # an entity in the corpus is shown as typed
    assert not re.search(r"<script>alert", page, re.I) and len(re.findall(r"<script\b", page)) == 2


def test_script_json_cannot_close_its_element():
    value = {"text": "</script><!-- a & b \u2028 \u2029 'q' \"dq\"", "nan": float("nan")}
    encoded = str(script_json(value))
    assert not set("<>&\u2028\u2029") & set(encoded)
    assert json.loads(encoded) == {"text": value["text"], "nan": None}


def test_the_bundled_model_note_shows_only_where_it_was_used(tmp_path):
    storage = FIXTURE.build_store(tmp_path)
    assert 'id="model-note"' not in write_viewer(storage, variant=V).read_text()
    path = asset_path(storage, "simulations", 1, V)
    write_parquet_atomic(pl.read_parquet(path).with_columns(pl.lit(BUNDLED_MODEL).alias("simulator")), path)
    index = write_viewer(storage, variant=V).read_text()
    assert 'id="model-note"' in index and html.escape(BUNDLED_MODEL_NOTE, quote=False) in index
    assert 'id="model-note"' not in write_index(storage, layers=[0], variant=V).read_text()


def test_the_viewer_module_is_a_report():
    """No Dagster, nothing of the Dagster skin, and the project's imports at module level."""
    tree = ast.parse(Path(viewer_module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "dagster" or m.startswith("ndx_pipeline.defs")]
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
        inner = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not [n for n in inner if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ndx_pipeline")
                    or isinstance(n, ast.Import) and any(a.name.startswith("ndx_pipeline") for a in n.names)], fn.name


def test_layer_pages_replace_stale_ones_and_the_index_covers_written_layers(tmp_path):
    storage = FIXTURE.build_store(tmp_path)
    out = tmp_path / "site"
    write_layer_pages(storage, 0, out, variant=V)
    (out / "0" / "999.html").write_text("stale")
    write_layer_pages(storage, 0, out, variant=V)
    assert sorted(p.name for p in (out / "0").iterdir()) == ["3.html", "7.html"]
    index = write_index(storage, out, variant=V).read_text()  # only layer 0 has pages so far
    assert 'href="0/3.html"' in index and 'href="1/' not in index
    assert 'href="1/9.html"' in write_index(storage, out, [0, 1], variant=V).read_text()
    # write_viewer for one layer keeps listing the layers already written
    write_viewer(storage, out, layers=[1], variant=V)
    index = (out / "index.html").read_text()
    assert 'href="0/3.html"' in index and 'href="1/9.html"' in index
    assert neuron_page_path(out, 1, 9).exists()
    # a folder of one's choosing holds that variant's pages only: nothing is written beside it, nor linked there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "storage"]
    assert not viewer_dir(storage).exists()
    assert "../index.html" not in index and "../../index.html" not in neuron_page_path(out, 1, 9).read_text()


def _prompt_block(page: Path) -> str:
    text = html.unescape(page.read_text())
    return text[text.index("<h3>Explainer prompt</h3>"):text.index("show the lineage as JSON")]


def test_prompt_block_shows_the_prompt_as_sent_and_says_when_it_cannot(viewer, tmp_path):
    """The fixture's explainer is an OpenAI-compatible server: the block shows the messages it was sent (the
    system message asking for the lead-in, no prefilled answer) and says the hash matches them."""
    page = viewer.parent / "0" / "3.html"
    block, text = _prompt_block(page), html.unescape(page.read_text())
    assert "show the exact prompt the explainer saw" in block
    assert "Write nothing else." in block and "assistant (continues)" not in block
    assert "matches the rebuilt prompt, as sent" in text
    # an explainer whose sending lineage cannot rebuild: said so, never a match
    storage = FIXTURE.build_store(tmp_path)
    path = asset_path(storage, "explanations", 0, V)
    write_parquet_atomic(pl.read_parquet(path).with_columns(pl.lit("someones-backend:m").alias("explainer")), path)
    out = write_viewer(storage, layers=[0], variant=V).parent
    block, text = _prompt_block(out / "0" / "3.html"), html.unescape((out / "0" / "3.html").read_text())
    assert "cannot be checked" in text and "not a known backend" in text and "matches the rebuilt" not in text
    assert "rebuilt from the excerpts (not verified)" in block and "exact prompt the explainer saw" not in block


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(NdxInputError, match="does not exist"):
        write_viewer(tmp_path / "missing", variant=V)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NdxInputError, match=rf"no layer of variant {V} has scores .*variants with scores: none"):
        write_viewer(tmp_path / "empty", variant=V)
    storage = FIXTURE.build_store(tmp_path)
    with pytest.raises(NdxInputError, match=rf"layers \[5\] of variant {V} have no scores"):
        write_viewer(storage, layers=[5], variant=V)
    with pytest.raises(NdxInputError, match=rf"no layer of variant other has scores .*variants with scores: {V}\)"):
        write_viewer(storage, variant="other")


# ---------------------------------------------------------------------------------------------------- variants


class _Rows(HTMLParser):
    """The rows of the tables whose id or class is `table`: (the row's attributes, the text of each cell)."""

    def __init__(self, table: str):
        super().__init__(convert_charrefs=True)
        self.table, self.inside, self.rows, self.cell = table, False, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.inside = self.table in (attrs.get("id"), attrs.get("class"))
        elif self.inside and tag == "tr" and any(k.startswith("data-") for k in attrs):
            self.rows.append((attrs, []))
        elif self.inside and tag == "td" and self.rows:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif tag == "td" and self.cell is not None:
            self.rows[-1][1].append(" ".join(self.cell.split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def _rows(page: Path, table: str) -> list[tuple[dict, list[str]]]:
    parser = _Rows(table)
    parser.feed(page.read_text())
    return parser.rows


def _scores(storage: Path, layer: int, variant: str) -> list[float]:
    frame = pl.read_parquet(asset_path(storage, "scores", layer, variant))
    return [v for v in frame["score"].to_list() if v == v]


def test_the_variants_index_lists_every_variant_with_scores(viewer):
    storage, top = _storage(viewer), viewer.parent.parent / "index.html"
    assert write_variants_index(storage) == top
    text = top.read_text()
    assert f'href="{V}/index.html"' in text and f'href="{OTHER}/index.html"' in text and 'href="compare.html"' in text
    rows = [(r["data-variant"], r["data-layer"], cells[-4:]) for r, cells in _rows(top, "variants")]
    expected = []
    for variant, layer in ((V, 0), (V, 1), (OTHER, 0)):
        scored = _scores(storage, layer, variant)
        units = len(FIXTURE.NEURONS[layer])
        expected.append((variant, str(layer), [str(layer), str(units), str(len(scored)),
                                               fmt_score(sum(scored) / len(scored))]))
    assert rows == expected
    assert expected[1][2][1:3] == ["2", "1"]  # layer 1 of V: two units, one scored (neuron 5's explanation failed)
    # each variant's index links back to it, and each unit page to both
    assert 'href="../index.html"' in viewer.read_text()
    assert 'href="../../index.html"' in (viewer.parent / "0" / "3.html").read_text()


def test_a_variant_without_pages_is_listed_without_a_link(tmp_path):
    storage = FIXTURE.build_store(tmp_path)
    FIXTURE.copy_variant(storage, V, OTHER, layers=[1])
    write_viewer(storage, variant=V)  # refreshes the pages over the variants
    top = viewer_dir(storage) / "index.html"
    text = top.read_text()
    assert f'href="{V}/index.html"' in text and f'href="{OTHER}/index.html"' not in text
    assert "pages not written yet" in text
    assert [(r["data-variant"], r["data-layer"]) for r, _ in _rows(top, "variants")] == [(V, "0"), (V, "1"),
                                                                                         (OTHER, "1")]


def test_the_compare_page_sets_the_variants_side_by_side(viewer):
    """Per layer, then pooled: a row per variant with units there, and the pairs' differences; the figures of
    `ndx-pipeline compare`."""
    from ndx_pipeline.reports.compare import compare

    storage, page = _storage(viewer), viewer.parent.parent / "compare.html"
    text = page.read_text()
    assert 'id="layer-0"' in text and 'id="layer-1"' in text and 'id="layer-all"' in text
    assert "mean lookup" in text and f'href="{V}/index.html"' in text and 'href="index.html"' in text
    rows = _rows(page, "compare")
    # layer 0: both variants; layer 1: V's alone; then both, pooled over the layers
    assert [r["data-variant"] for r, _ in rows] == [V, OTHER, V, V, OTHER]
    for (attrs, cells), layers in zip(rows, ([0], [0], [1], [0, 1], [0])):
        variant = attrs["data-variant"]
        frame = pl.concat([pl.read_parquet(asset_path(storage, "scores", layer, variant)) for layer in layers])
        scored = sorted(v for v in frame["score"].to_list() if v == v)
        lookup = [v for v in frame["baseline_lookup"].to_list() if v == v]
        mean = sum(scored) / len(scored)
        assert cells[:4] == [variant, str(len(frame)), str(len(scored)), fmt_score(mean)], cells
        low, high = (float(x) for x in re.fullmatch(r"\[(\S+), (\S+)\]", cells[4]).groups())
        assert low <= round(mean, 3) <= high
        assert cells[5] == fmt_score(float(np.median(scored))) and cells[6] == fmt_score(sum(lookup) / len(lookup))
    # the pairs (none in layer 1, V's alone): OTHER's scores are V's moved by SHIFT, on both units of layer 0
    pairs = [(r["data-a"], r["data-b"], cells[2], cells[4:9]) for r, cells in _rows(page, "pairs")]
    assert pairs == [(V, OTHER, fmt_score(SHIFT), ["2", "0", "2", "0", fmt_score(SHIFT)]),
                     (V, OTHER, pairs[1][2], ["2", "0", "2", "0", fmt_score(SHIFT)])]
    result = compare(storage)
    pooled = next(r for r in result["pairs"] if r["layer"] == "all")
    assert pairs[1][2] == fmt_score(pooled["diff"]) != fmt_score(SHIFT)  # V's layer 1 counts in its pooled mean
    shown = [cells for _, cells in rows]
    assert shown == [[r["variant"], str(r["units"]), str(r["scored"]), fmt_score(r["mean"]),
                      f"[{fmt_score(r['ci_low'])}, {fmt_score(r['ci_high'])}]", fmt_score(r["median"]),
                      *map(fmt_score, r["baselines"].values())] for r in result["summary"] if r["units"]]


def test_the_pages_over_variants_say_when_there_is_none(tmp_path):
    (tmp_path / "storage").mkdir()
    index = write_variants_index(tmp_path / "storage")
    assert index == viewer_dir(tmp_path / "storage") / "index.html"
    assert "No variant has scores yet." in index.read_text()
    assert "No variant has scores yet." in (index.parent / "compare.html").read_text()


def test_unit_pages_link_to_the_same_unit_in_the_other_variants(viewer):
    storage = _storage(viewer)
    mine = (viewer.parent / "0" / "3.html").read_text()
    theirs = (viewer.parent.parent / OTHER / "0" / "3.html").read_text()
    assert f'<a href="../../{OTHER}/0/3.html">{OTHER}</a>' in mine
    assert f'<a href="../../{V}/0/3.html">{V}</a>' in theirs and f"../../{OTHER}/" not in theirs
    # the other variant's score beside its link
    other_score = pl.read_parquet(asset_path(storage, "scores", 0, OTHER)).filter(pl.col("neuron") == 3)["score"][0]
    assert re.search(rf'{OTHER}</a><span class="badge [^"]*">{re.escape(fmt_score(other_score))}</span>', mine)
    assert 'id="other-variants"' not in (viewer.parent / "1" / "9.html").read_text()  # layer 1 is V's alone


def test_cross_variant_links_follow_the_pages_written_and_the_unit_kind(tmp_path):
    """A page links to the pages of the other variants written when it is; never to a unit of another kind."""
    storage = FIXTURE.build_store(tmp_path)
    FIXTURE.copy_variant(storage, V, OTHER, layers=[0])
    first = write_viewer(storage, layers=[0], variant=V).parent
    assert 'id="other-variants"' not in (first / "0" / "3.html").read_text()  # OTHER has no pages yet
    write_viewer(storage, variant=OTHER)
    write_viewer(storage, layers=[0], variant=V)
    assert f"../../{OTHER}/0/3.html" in (first / "0" / "3.html").read_text()
    # OTHER's units become dictionary latents: latent 3 is not neuron 3
    path = asset_path(storage, "activation_records", 0, OTHER)
    write_parquet_atomic(pl.read_parquet(path).with_columns(pl.lit(DICTIONARY_LATENT).alias("unit_kind")), path)
    write_viewer(storage, layers=[0], variant=V)
    assert 'id="other-variants"' not in (first / "0" / "3.html").read_text()
    compare = (first.parent / "compare.html").read_text()
    assert 'class="pairs"' not in compare and f'data-variant="{OTHER}"' in compare


# ---------------------------------------------------------------------------------------------------- browser


def _chromium() -> tuple[str, str]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None)
    if browser is None or driver is None:
        pytest.skip("headless browser test needs Chromium and its driver: apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def _screenshot_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("NDX_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _full_page_screenshot(drv, path: Path, max_height: int = 6000) -> None:
    drv.execute_script("document.getElementById('tip').style.display='none'; window.scrollTo(0, 0);")
    height = min(max_height, int(drv.execute_script("return document.documentElement.scrollHeight")))
    drv.set_window_size(1400, max(height, 600))
    time.sleep(0.2)
    drv.save_screenshot(str(path))
    drv.set_window_size(1400, 1000)


def _errors(drv) -> list[dict]:
    return [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _visible_rows(drv) -> list[tuple[str, str]]:
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('#neurons tbody tr')).filter(r=>!r.hidden)"
        ".map(r=>[r.dataset.layer, r.dataset.neuron]);")


@pytest.mark.ui_browser
def test_index_in_a_real_browser(browser, viewer, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(viewer.as_uri())
    assert browser.title.startswith("Neuron viewer")
    assert _visible_rows(browser) == [["0", "3"], ["0", "7"], ["1", "5"], ["1", "9"]]
    assert browser.find_element(By.ID, "count").text == "4 of 4 neurons"

    text = browser.find_element(By.ID, "f-text")
    text.send_keys("return")
    assert _visible_rows(browser) == [["0", "7"]]
    assert browser.find_element(By.ID, "count").text == "1 of 4 neurons"
    text.clear()
    text.send_keys("<script>")  # the hostile explanation is searchable as plain text
    assert _visible_rows(browser) == [["0", "3"]]
    text.clear()
    token = browser.find_element(By.ID, "f-token")
    token.send_keys("(")
    assert ["1", "9"] in _visible_rows(browser) and ["0", "7"] not in _visible_rows(browser)
    token.clear()

    browser.execute_script("var s=document.getElementById('f-layer'); s.value='1';"
                           "s.dispatchEvent(new Event('change'));")
    assert _visible_rows(browser) == [["1", "5"], ["1", "9"]]
    browser.execute_script("var s=document.getElementById('f-layer'); s.value='all';"
                           "s.dispatchEvent(new Event('change'));")
    minimum = browser.find_element(By.ID, "f-min")
    minimum.send_keys("0.99")
    rows = _visible_rows(browser)
    assert rows and ["1", "5"] not in rows  # the NaN score never passes a score filter
    minimum.clear()
    minimum.send_keys("-1")

    # Sorting by score: highest first, the undefined score last.
    browser.find_element(By.CSS_SELECTOR, "th[data-key=score]").click()
    scores = browser.execute_script(
        "return Array.from(document.querySelectorAll('#neurons tbody tr')).map(r=>r.dataset.score);")
    numbers = [float(s) for s in scores if s]
    assert numbers == sorted(numbers, reverse=True) and scores[-1] == ""
    minimum.clear()
    assert browser.execute_script("return window.__pwned === undefined")
    assert not _errors(browser), _errors(browser)
    _full_page_screenshot(browser, _screenshot_dir(tmp_path) / "viewer_index.png")


@pytest.mark.ui_browser
def test_neuron_page_in_a_real_browser(browser, viewer, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = viewer.parent / "0" / "3.html"
    browser.get(page.as_uri())
    h1 = browser.find_element(By.TAG_NAME, "h1").text
    assert h1 == "Layer 0 · neuron 3"
    assert browser.find_element(By.CSS_SELECTOR, ".explanation").text == "HTML tags " + PAYLOAD
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    # Tag tokens of the corpus are shown as text in the heatmaps.
    token_texts = browser.execute_script("return Array.from(document.querySelectorAll('.ex .t')).map(t=>t.textContent)")
    assert any(t.strip().startswith("<img") for t in token_texts) or any(t.strip() == "<script>" for t in token_texts)

    cells = browser.find_elements(By.CSS_SELECTOR, "#scored .ex .t")
    assert len(cells) >= 4 * FIXTURE.WINDOW * 2  # 4 scored excerpts, real and simulated side by side
    assert browser.execute_script("return document.querySelectorAll('#top .ex').length") == FIXTURE.TOP_K
    assert browser.execute_script("return document.querySelectorAll('#random .ex').length") == FIXTURE.RANDOM_K
    hot = browser.execute_script(
        "return Array.from(document.querySelectorAll('#top .ex .t')).filter(t=>t.style.background).length")
    assert hot > 0
    assert browser.execute_script("return document.querySelectorAll('#histogram svg rect.bar').length") > 0

    # Hovering a token shows its exact activation and simulated value.
    target = next(c for c in cells if c.get_attribute("data-a") and c.get_attribute("data-s"))
    ActionChains(browser).move_to_element(target).perform()
    tip = browser.find_element(By.ID, "tip")
    assert tip.is_displayed()
    assert f"activation  {target.get_attribute('data-a')}" in tip.text and "simulated" in tip.text

    # Lineage: runs, documents, the verified prompt and the JSON.
    lineage = browser.find_element(By.ID, "lineage").text
    assert "run-aaaa" in lineage and "every link resolves" in lineage and "matches the rebuilt prompt" in lineage
    assert PAYLOAD in lineage  # the document source, shown as text
    browser.execute_script("document.getElementById('lineage-json-view').closest('details').open = true;")
    time.sleep(0.1)
    shown = json.loads(browser.find_element(By.ID, "lineage-json-view").get_attribute("textContent"))
    assert shown["neuron"] == 3 and shown["excerpts"]
    # Each excerpt can be seen in its document, the excerpt marked: the same text the lineage JSON carries.
    marked = browser.execute_script("return Array.from(document.querySelectorAll('#lineage .ctx mark'))"
                                    ".map(m=>m.textContent)")
    assert marked[: len(shown["excerpts"])] == [x["text"] for x in shown["excerpts"]]
    assert not _errors(browser), _errors(browser)
    _full_page_screenshot(browser, _screenshot_dir(tmp_path) / "viewer_neuron.png")
