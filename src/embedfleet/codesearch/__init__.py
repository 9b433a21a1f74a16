"""Code search on top of embedfleet (``pip install 'embedfleet[codesearch]'``).

Files are walked with the repository's ignore rules (:mod:`.files`), cut at function and class boundaries
with tree-sitter (:mod:`.chunking`), embedded through an embedfleet gateway (:mod:`.embedder`, :mod:`.service`)
and stored in Qdrant (:mod:`.store`); :mod:`.index` re-indexes incrementally and :mod:`.search` answers queries,
from the command line (:mod:`.cli`) or a small web page (:mod:`.ui`).
"""
