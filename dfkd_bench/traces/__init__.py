"""Step-equivalence to the authors' code: trace files, their replay through the engine, the card lines.

A **trace** records what an official training loop did, run from a checkout of the authors'
repository at a pinned commit, started from the suite's initial weights and fed the suite's random
draws, in float64: the initial state, the draws in the order consumed, and after every
optimisation step its losses and every parameter, buffer and optimiser state
(:mod:`~dfkd_bench.traces.format`). A **replay** runs the suite's own engine and method from the
same state with the same draws and compares every step (:mod:`~dfkd_bench.traces.replay`);
``tests/test_traces.py`` replays every committed trace on the reference and the fast engine path
and requires each step within ``RTOL`` (1e-7) of the official values. Each method's protocol card
carries the result (:mod:`~dfkd_bench.traces.cards`).

Files: the traces are committed records of runs of the official code, so they live with the other
records in ``results/traces/`` (``NAME.pt``, float64, well under 1 MB, loaded with
``weights_only=True``; ``NAME.json``, the summary the cards and the README quote, with the command
that regenerates both). The tracers are scripts, ``scripts/trace/<method>.py``: they import the
official code from a checkout path given on the command line, never from this repository, and
nothing in ``dfkd_bench`` imports them.

Adding a tracer (``scripts/trace/dfad.py`` is the model to copy; ``scripts/trace/common.py`` has the parts):

1. Take facts from the official loop: the optimisers and their settings, the order of updates, the
   train/eval modes, what is detached. Mirror the repository (``fetch``), pin its commit, and list the
   files the tracer reads with their git blob ids (``common.check_checkout`` refuses other files).
2. Write ``meta`` (see :mod:`~dfkd_bench.traces.format`): the suite's run under the protocol that
   cites the code (``common.protocol_config`` resolves it and lists what the trace changes in
   ``trace_sized``), made trace-sized -- small networks of a :data:`~dfkd_bench.traces.replay.FAMILIES`
   family (add a family there if needed), a small batch, a few iterations -- with every alignment
   stated in ``alignments`` (stage order, input size, widths, float64, the draws) and every run-time
   patch in ``patches``. ``schedule`` lists the engine calls (``iteration``, ``student_stage``,
   ``generator_steps``) that run the official order of updates. (``common.lenet_generator_meta`` does
   all of this for a LeNet-5 pair and a paper generator on MNIST.)
   State the official loop holds only part of the time (a pool method's batch in progress) is None
   when it has none; what the suite starts earlier goes in ``ahead`` (``scripts/trace/datafree.py`` is
   the model for pool methods).
3. Write ``run_official(checkout, workdir, teacher, randn)``: run the official entry point with
   ``torch.randn`` replaced by ``randn``, patched only where it cannot run on a CPU or without its data,
   or to make its networks trace-sized (``common.load_official_module`` with ``scale_widths`` changes
   channel counts in the official source and nothing else; ``common.padded_to`` is the 28-px
   alignment of the official LeNet-5); list each patch in the tracer's docstring; never change the
   arithmetic.
4. Trace: ``common.trace_lenet_generator`` (or, for another state, the same few lines around
   ``common.OfficialRun``) builds the suite's run with the engine's own ``build()`` in float64, feeds
   the official loop the suite's draws (its method stream), copies the suite's initial weights into the
   official networks before the first draw, and records after each official optimiser step (a
   post-step hook) the losses, read from the official frame's variables, and the full state in the
   suite's names. ``common.tracer_main`` gives the command line; ``common.finish`` saves the trace,
   replays it on every engine path (:data:`~dfkd_bench.traces.replay.VARIANTS`) and writes the summary.
5. Commit ``results/traces/NAME.pt`` and ``NAME.json``; add the method to ``OFFICIAL_CODE`` and a
   mutation test to ``tests/test_traces.py`` -- a changed loss weight, detach point, train/eval mode,
   optimiser setting or order of updates that ``replay(..., stop_beyond=RTOL)`` must reject -- the
   checkout's variable to its ``TRACERS`` (the slow regeneration test), and the tracer's command to
   the README's fidelity section.

Methods draw their training noise through :meth:`MethodContext.randn
<dfkd_bench.method_api.MethodContext.randn>` / ``randint`` / ``draw`` (and re-draw parameters through
``uniform_`` / ``normal_``: NAYER's generator), which the replay feeds from the trace
(:attr:`MethodContext.draws <dfkd_bench.method_api.MethodContext.draws>`); every other draw from the
method's stream -- ``torch.randn`` / ``rand`` / ``randint`` / ``randperm`` with ``generator=ctx.rng``
(a pool method's pixels, jitter, pool indices, crops) -- is fed from the same list
(:func:`~dfkd_bench.traces.replay.method_stream`). A tracer whose official loop draws in another order
than the suite records the suite's own draws first, each with the suite function that made it
(``scripts/trace/common.py: suite_draws_by_site``), and hands each official draw the suite's draw of
the same purpose.

May import: train, teachers, presets, store, config, runtime, method_api, models, data, errors.
"""
