"""The paper's campaigns at CPU scale: the norms compared on real corpora, run by run, resumably,
and the tables drawn from their records.

Usage (from the project directory, which holds ``data/``, ``runs/`` and ``results/``; ``--root``
names another; ``powernorm-reproduce`` is the same command)::

    python scripts/reproduce.py multi30k --seeds 1,2,3 --jobs 2 --threads 1   # the converged campaign
    python scripts/reproduce.py ptb --seeds 1,2,3 --jobs 2 --threads 1
    python scripts/reproduce.py multi30k --campaign budget --norms ln --seeds 1 # the budget run
    python scripts/reproduce.py ptb --seeds 1,2,3 --jobs 2 --threads 1 --commit  # and commit each finished run
    python scripts/make_results.py          # tables + plots from the records

The package (one purpose a module; none imports one above it: spec <- records <- setaside <- run
<- bootstrap, status <- commit, cli; view <- figures <- tables, analyses, budget, pilot <- make):

* :mod:`.spec`: the campaigns as data (``CORPORA``, ``CAMPAIGNS``), a record at a cap;
* :mod:`.records`, :mod:`.setaside`, :mod:`.run`: a run's record, what it sets aside, its training;
* :mod:`.bootstrap`, :mod:`.status`, :mod:`.commit`, :mod:`.cli`: the paired bootstraps, the status
  table, the git commits, the command line (``powernorm-reproduce``, ``scripts/reproduce.py``);
* :mod:`.view`, :mod:`.figures`, :mod:`.tables`, :mod:`.analyses`, :mod:`.budget`, :mod:`.pilot`,
  :mod:`.make`: the tables and figures from the records (``powernorm-results``,
  ``scripts/make_results.py``).

Campaigns (``--campaign``; every setting of each lives in ``spec.CAMPAIGNS``, once):

* ``converged`` (default, the main campaign): the preset ``<prefix>_<norm>`` trained as the
  paper does: a checkpoint every epoch, stop after ``PATIENCE`` epochs without a better validation
  loss (the released ``--early-stop 5``; fairseq's ``--patience``), with an epoch cap per corpus.
  Each run is evaluated three ways: the paper's protocol (the average of the last 5 epoch
  checkpoints), the best checkpoint, and the last. For BLEU, each norm's averaged model is then
  compared with LN's of the same seed by sacreBLEU's paired bootstrap, from the translations kept
  beside the records (``<run>.avg.hyp*.txt``).
  Records: ``results/runs/<corpus>/<norm>_s<seed>.json``. Raising a corpus's cap (``CORPORA``)
  reopens the runs the old cap stopped: they train on from their last checkpoint and are
  evaluated again, their earlier ending kept aside (:meth:`Run.reopen`). ``--supersede ln_s2
  --reason ...`` sets a done run's record aside (``superseded/``) so that the same command trains
  it again from update 0, for a run whose test translations were lost (:meth:`Run.supersede`).
* ``mechanism``: issue 36's norms (RMSNorm, GroupScaling alone, Algorithm 2 and PN-V after
  GroupScaling, Dynamic Tanh) with the converged campaign's settings, protocol and seeds, at its
  first cap (Multi30k 30 epochs, PTB 12): records beside the converged ones, the same LN of each
  seed their baseline.
* ``budget``: one run to convergence that keeps every epoch checkpoint (the campaign's sizing
  run). Records: ``results/budget/<corpus>/``.
* ``pilot``: the earlier short fixed budgets (500 / 300 updates, the last 3 update checkpoints
  averaged). Records: ``results/pilot/runs/<corpus>/``. Kept so those records stay reproducible.

For every (norm, seed) it runs, each step skipped when already done, through the pipeline's stages
(:mod:`powernorm_fairseq.pipeline.runner`): train (``pipeline.train`` with the preset and the
campaign's overrides: batch scaled to the world size, a truncated ``checkpoint_last.pt`` repaired,
``launch.json`` written; checkpoints in ``runs/<campaign>/<corpus>/<norm>_s<seed>/``, git-ignored;
rerunning the same command resumes from ``checkpoint_last.pt``), average, evaluate.
The record (status, command, commit, seed, hardware, wall time and core-hours of each segment, the
validation curve, the stopping epoch, the evaluations) is rewritten after every step, and so is the
campaign's status table ``results/status.md`` (done / running / to do, core-hours spent and left).
"""

