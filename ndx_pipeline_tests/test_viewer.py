"""The static neuron viewer: files, escaping, and a real headless Chromium opening them from disk."""

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

import polars as pl
import pytest

from ndx_pipeline.core.errors import NdxInputError
from ndx_pipeline.core.models import BUNDLED_MODEL, BUNDLED_MODEL_NOTE
from ndx_pipeline.core.storage import asset_path, write_parquet_atomic
from ndx_pipeline.reports import viewer as viewer_module
from ndx_pipeline.reports.viewer import (
    neuron_page_path,
    script_json,
    static_text,
    write_index,
    write_layer_pages,
    write_viewer,
)


def _load_fixture_builder():
    spec = importlib.util.spec_from_file_location("ndx_lineage_fixture", Path(__file__).with_name("test_lineage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURE = _load_fixture_builder()
# Text that would run if it were ever inserted as HTML: in an explanation and in a document's source.
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> &amp; &lt;b&gt;'
RUNS = {0: {"activation_records": {"run_id": "run-aaaa", "code_version": "cv1", "data_version": "dv1"},
            "scores": {"run_id": "run-bbbb", "code_version": "cv2", "data_version": "dv2"}}}


def _hostile_store(root: Path) -> Path:
    storage = FIXTURE.build_store(root)
    for asset in ("explanations", "scores"):
        path = asset_path(storage, asset, 0)
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
    storage = _hostile_store(tmp_path_factory.mktemp("viewer"))
    return write_viewer(storage, runs=RUNS)


def test_writes_an_index_and_a_page_per_scored_neuron(viewer):
    out = viewer.parent
    assert viewer.name == "index.html" and out.name == "neuron_viewer"
    pages = sorted(str(p.relative_to(out)) for p in out.rglob("*.html"))
    assert pages == ["0/3.html", "0/7.html", "1/5.html", "1/9.html", "index.html"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files were left behind"
    index = viewer.read_text()
    for page in pages[:-1]:
        assert f'href="{page}"' in index
    assert "baseline token lookup" in index and "score top" in index and "score random" in index


def test_pages_are_self_contained(viewer):
    for page in viewer.parent.rglob("*.html"):
        text = page.read_text()
        assert "default-src 'none'" in text  # the CSP forbids every fetch
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text), page
        assert "@import" not in text and "url(" not in text
        assert not re.search(r"<(link|iframe|object|embed|img)\b", text), page


def test_pages_inline_the_static_files_and_link_only_to_each_other(viewer):
    out = viewer.parent
    for page in out.rglob("*.html"):
        text = page.read_text()
        assert static_text("viewer.css") in text and static_text("tooltip.js") in text
        assert (static_text("index.js") in text) == (page == viewer)
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
    records = pl.read_parquet(asset_path(viewer.parent.parent, "activation_records", 0))
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
    assert 'id="model-note"' not in write_viewer(storage).read_text()
    path = asset_path(storage, "simulations", 1)
    write_parquet_atomic(pl.read_parquet(path).with_columns(pl.lit(BUNDLED_MODEL).alias("simulator")), path)
    index = write_viewer(storage).read_text()
    assert 'id="model-note"' in index and html.escape(BUNDLED_MODEL_NOTE, quote=False) in index
    assert 'id="model-note"' not in write_index(storage, layers=[0]).read_text()


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
    write_layer_pages(storage, 0, out)
    (out / "0" / "999.html").write_text("stale")
    write_layer_pages(storage, 0, out)
    assert sorted(p.name for p in (out / "0").iterdir()) == ["3.html", "7.html"]
    index = write_index(storage, out).read_text()  # only layer 0 has pages so far
    assert 'href="0/3.html"' in index and 'href="1/' not in index
    assert 'href="1/9.html"' in write_index(storage, out, [0, 1]).read_text()
    # write_viewer for one layer keeps listing the layers already written
    write_viewer(storage, out, layers=[1])
    index = (out / "index.html").read_text()
    assert 'href="0/3.html"' in index and 'href="1/9.html"' in index
    assert neuron_page_path(out, 1, 9).exists()


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
    path = asset_path(storage, "explanations", 0)
    write_parquet_atomic(pl.read_parquet(path).with_columns(pl.lit("someones-backend:m").alias("explainer")), path)
    out = write_viewer(storage, layers=[0]).parent
    block, text = _prompt_block(out / "0" / "3.html"), html.unescape((out / "0" / "3.html").read_text())
    assert "cannot be checked" in text and "not a known backend" in text and "matches the rebuilt" not in text
    assert "rebuilt from the excerpts (not verified)" in block and "exact prompt the explainer saw" not in block


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(NdxInputError, match="does not exist"):
        write_viewer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NdxInputError, match="no layer has scores"):
        write_viewer(tmp_path / "empty")
    storage = FIXTURE.build_store(tmp_path)
    with pytest.raises(NdxInputError, match=r"layers \[5\] have no scores"):
        write_viewer(storage, layers=[5])


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
