"""The shape of the project: no import cycle in utils (imports inside functions count), a short README that links
the docs pages, and docs that describe the project as it is (no development history)."""
import ast
import re

from utils.config import REPO_ROOT

UTILS = REPO_ROOT / "utils"


def import_graph() -> dict[str, set[str]]:
    """utils module -> the utils modules it imports anywhere in its file (top level or inside functions)."""
    graph = {}
    for path in sorted(UTILS.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "utils":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("utils.")}
        graph[path.stem] = names - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's module list found by depth-first search (enough to name one per back edge)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                found.append(path[path.index(child):] + [child])
            elif child not in state:
                visit(child, path + [child])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_in_utils_imports_inside_functions_included():
    graph = import_graph()
    assert {"machine", "runs", "train", "jobs", "config"} <= set(graph)
    assert cycles(graph) == []
    assert graph["machine"] <= {"config"} and graph["config"] <= {"files"}  # the leaves stay leaves


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_readme_is_short_and_links_the_docs_pages():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = set(re.findall(r"\]\((docs/[a-z_]+\.md)\)", readme))
    assert len(linked) >= 3 and all((REPO_ROOT / page).is_file() for page in linked)


def test_readme_and_docs_describe_the_project_not_its_history():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    history = re.compile(r"\bissue \d+|\bprevious session|\bthis session|\bstop \d+\b", re.IGNORECASE)
    for page in pages:
        assert not history.search(page.read_text()), f"{page.name}: {history.search(page.read_text()).group()}"
    for page in pages:  # every relative link points at a file that exists
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}"
