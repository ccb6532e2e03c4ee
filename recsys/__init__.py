"""Multi-task recommenders on torchrec whose gates are core routers: Single-Task, Shared-Bottom,
OMoE, MMoE, CGC, PLE and ESMM (``recsys.models``); the MMoE synthetic generator, UCI Adult,
MovieLens-100k and census-income (KDD) data (``recsys.data``); training on the shared engine
(``python -m recsys.train``) and the summary table (``python -m recsys.summarize``)."""
