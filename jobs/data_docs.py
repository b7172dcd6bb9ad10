"""The Data Docs site's page views: GX's own, with their Jinja templates compiled once per machine.

GX builds new views at every validation (each gate rebuilds the site), and each view a new Jinja
environment that compiles its ~50 templates again: ~0.4 s of Python per gate
(``benchmarks/data_docs_index.py``). Jinja's bytecode cache keeps the compiled templates on disk
(the user's temp dir, private to the user, written atomically, keyed by each template's source
checksum), so every gate of every process after the first loads them instead. The site config
names these classes (``quality._context``); GX imports this module only when it renders.
"""

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import FileSystemBytecodeCache

try:
    _COMPILED = FileSystemBytecodeCache()
except RuntimeError:  # no private temp dir to keep them in: compile at every gate, as GX does
    _COMPILED = None


class _CompiledOnce:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = _COMPILED


class PageView(_CompiledOnce, DefaultJinjaPageView):
    """A validation result's or a suite's page."""


class IndexPageView(_CompiledOnce, DefaultJinjaIndexPageView):
    """The site's index page."""
