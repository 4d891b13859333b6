"""The pages that show measured figures say what the benches' JSON says: docs/benchmarks.md and the
README's results summary are rendered again from the committed JSON and compared."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pages():
    spec = importlib.util.spec_from_file_location("pages", ROOT / "bench" / "pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_page_and_readme_figures_equal_their_json():
    pages = _pages()
    real_models, _, effectiveness, _, _ = figures = pages.current()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == pages.page(*figures) + "\n", \
        "docs/benchmarks.md is stale: python bench/pages.py"
    readme = (ROOT / "README.md").read_text()
    assert pages.readme_with_section(readme, pages.readme_section(real_models, effectiveness)) == readme, \
        "the README's results summary is stale: python bench/pages.py"


def test_a_changed_figure_is_caught():
    """The check above can fail: a figure edited by hand in the JSON's rendering differs."""
    pages = _pages()
    real_models, _, effectiveness, _, _ = pages.current()
    edited = {"models": [{**real_models["models"][0], "restored": real_models["models"][0]["restored"] + 1}, *real_models["models"][1:]]}
    assert pages.readme_section(edited, effectiveness) != pages.readme_section(real_models, effectiveness)


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350
