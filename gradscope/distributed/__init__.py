"""Distributed training: statistics rows across ranks.

Receives each rank's statistics rows (from :mod:`gradscope.stats`) and the model's layout
over ranks, and hands on rows that describe the whole gradient on every rank, plus what
only a view across ranks can tell:

* ``topology``: how a watched model is spread (single, DDP-replicated, FSDP2/DTensor-sharded);
* ``sharded``: combining sharded rows with two asynchronous all-reduces (the row's declared
  combine rule, applied across ranks);
* ``rank_rows``: combining rows each rank measures on its own data (forward statistics);
* ``replicas``: DDP's communication hook and the per-step check that replicas agree;
* ``noise_scale``: the gradient noise scale from per-rank and averaged gradient norms;
* ``pipeline``: pipeline-parallel stages: where a watched stage stands, that no two stages
  name a row alike, which ranks log;
* ``collectives``: waiting on asynchronous collectives.
"""
