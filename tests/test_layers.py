"""The package's layers and its one import rule (lib/replbook/README.md), read from the
sources with ast: a module imports only layers below its own or modules of its own layer,
and a paper module never imports another paper module (nor does anything below the papers).

Issue #24 removed the last violations: KNOWN_VIOLATIONS is empty and stays so. A
chapter's code version therefore counts its own paper module and nothing of another
chapter's (checked below on every notebook), so a change to one paper's method makes only
that chapter's results and stability record stale."""
import ast
import re
from pathlib import Path

import pytest

from replbook import results

PACKAGE = Path(results.__file__).parent
README = PACKAGE / "README.md"

# lowest first; the name of each layer is the one the README uses
LAYERS: dict[str, frozenset[str]] = {
    "core": frozenset({"config", "paths", "results", "numerics", "plotting", "scoreboard", "gpu_records"}),
    "organisms": frozenset({"models", "lm", "images", "cliplike", "captionclip", "data", "countries", "architectures"}),
    "papers": frozenset({"zoo", "restor", "skillslices", "intcoop", "endor", "t2icomp", "mllmtrace", "drew",
                         "loki", "vitdecomp", "semtokens"}),
    "commands": frozenset({"cli", "runner", "prepare", "stability", "dryrun", "resources"}),
}
ORDER = list(LAYERS)

# (importer, imported) pairs that break the rule today; see the module docstring
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()  # issue #24 removed the last ones


def layer_of(module: str) -> str:
    found = [name for name, members in LAYERS.items() if module in members]
    assert len(found) == 1, (f"replbook.{module} is in {len(found)} layers; place it in exactly one of "
                             f"{ORDER} (LAYERS here and the table in lib/replbook/README.md)")
    return found[0]


def imports() -> dict[str, set[str]]:
    """module -> the replbook modules it imports anywhere in its source (lazy imports too)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    return {m: results._replbook_imports(ast.parse((PACKAGE / f"{m}.py").read_text())) & modules - {m}
            for m in sorted(modules)}


def allowed(importer: str, imported: str) -> bool:
    low, high = ORDER.index(layer_of(imported)), ORDER.index(layer_of(importer))
    if layer_of(importer) == layer_of(imported) == "papers":
        return False
    return low <= high


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, deps in graph.items() for b in deps if not allowed(a, b)}


def test_every_module_is_in_exactly_one_layer():
    for module in imports():
        layer_of(module)
    assert not set().union(*LAYERS.values()) - set(imports()), "LAYERS names a module that does not exist"


def test_the_rule_refuses_a_paper_importing_a_paper_and_the_registry_importing_a_paper():
    """The rule itself, on the imports a plausible regression would add."""
    assert not allowed("intcoop", "vitdecomp") and not allowed("models", "semtokens")
    assert not allowed("paths", "models") and not allowed("cliplike", "drew")
    assert allowed("semtokens", "models") and allowed("results", "paths") and allowed("cli", "skillslices")
    graph = {"models": {"paths"}, "intcoop": {"cliplike", "vitdecomp"}, "cliplike": {"models"}, "vitdecomp": set(),
             "paths": set()}
    assert violations(graph) == {("intcoop", "vitdecomp")}


def test_imports_follow_the_layers_except_the_listed_violations_which_only_shrink():
    found = violations(imports())
    new = found - KNOWN_VIOLATIONS
    assert not new, f"imports that break the layer rule (lib/replbook/README.md): {sorted(new)}"
    gone = KNOWN_VIOLATIONS - found
    assert not gone, f"fixed, so remove from KNOWN_VIOLATIONS and from the README: {sorted(gone)}"


def test_no_import_circle_outside_the_listed_violations():
    """Within a layer modules may import each other, but never round in a circle."""
    import graphlib

    graph = {m: {d for d in deps if (m, d) not in KNOWN_VIOLATIONS} for m, deps in imports().items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"an import circle: {' -> '.join(err.args[1])}")


def test_the_readme_table_of_layers_and_its_import_picture_match_the_code():
    """The README's layer table and its 'who imports whom' block are the code's, line for line."""
    text = README.read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|", text, flags=re.M))
    assert {layer: set(re.findall(r"`(\w+)`", members)) for layer, members in table.items()} == \
        {layer: set(members) for layer, members in LAYERS.items()}
    picture = re.search(r"```text\n(.*?)```", text, flags=re.S).group(1)
    drawn = {line.split("->")[0].strip(): {m.strip().rstrip(" !") for m in line.split("->")[1].split(",") if m.strip()}
             for line in picture.splitlines() if "->" in line}
    graph = imports()
    assert drawn == {m: deps for m, deps in graph.items() if deps}, \
        "the README's import picture is out of date; `pytest tests/test_layers.py -k picture -s` prints it"
    marked = {(line.split("->")[0].strip(), m.strip().rstrip(" !")) for line in picture.splitlines() if "->" in line
              for m in line.split("->")[1].split(",") if m.strip().endswith("!")}
    assert marked == KNOWN_VIOLATIONS, "the picture marks each rule-breaking import with '!' and no other"


@pytest.fixture(autouse=True, scope="module")
def _print_picture(request):
    """With -s, print the picture the README should hold."""
    yield
    if request.config.getoption("capture") == "no":
        bad = violations(imports())
        for module, deps in imports().items():
            if deps:
                print(f"{module:<12} -> " + ", ".join(f"{d} !" if (module, d) in bad else d for d in sorted(deps)))


def test_each_chapter_reaches_only_its_own_paper_module():
    """The code version of a chapter (results.method_modules) holds one paper module, its own:
    before #24, every chapter reached t2icomp, mllmtrace and zoo through models, so a fix to
    chapter 05 made all eleven chapters' results and stability records stale."""
    root = PACKAGE.parent.parent
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(notebooks) == 11
    for notebook in notebooks:
        papers = [m for m in results.method_modules(notebook) if m in LAYERS["papers"]]
        assert len(papers) == 1, f"{notebook.stem} reaches the paper modules {papers}"
