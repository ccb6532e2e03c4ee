"""A Hydra search-path plugin: puts the suite's shared config groups (``pkg://conf``: ``router/``,
``trainer/``, ``hydra/``, ``shared/``) on the search path of the four domains' entry points, whose
primary configs live in ``pkg://conf/<domain>``.

The primaries also list ``pkg://conf`` in ``hydra.searchpath``, which is enough to compose; but
Hydra 1.3 expands a sweep's ``glob(...)`` (``-m '+router=glob(*)'``) without that setting
(facebookresearch/hydra#1942), so the plugin adds the same entry where the sweeper can see it.
Other Hydra applications are left alone: the entry is added only when the primary config comes
from this suite's ``conf`` package.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

SHARED = "pkg://conf"


class MoESuiteSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        entries = search_path.get_path()
        ours = any(e.provider == "main" and str(e.path).rstrip("/").startswith(SHARED + "/") for e in entries)
        if ours and not any(str(e.path).rstrip("/") == SHARED for e in entries):
            search_path.append(provider="moe-suite", path=SHARED)
