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

Adding a tracer (``scripts/trace/dfad.py`` is the model to copy):

1. Take facts from the official loop: the optimisers and their settings, the order of updates, the
   train/eval modes, what is detached. Mirror the repository (``fetch``) and pin its commit.
2. Write ``meta`` (see :mod:`~dfkd_bench.traces.format`): the suite's run under the protocol that
   cites the code (``scripts/trace/common.py: protocol_config`` resolves it), made trace-sized --
   small networks of a :data:`~dfkd_bench.traces.replay.FAMILIES` family (add a family there if
   needed), a small batch, a few iterations -- and every alignment stated in ``alignments``
   (stage order, input size, widths, float64, the draws). ``schedule`` lists the engine calls
   (``iteration``, ``student_stage``, ``generator_steps``) that run the official order of updates.
3. Build the suite's initial state with ``common.suite_start`` (the engine's own ``build()`` in
   float64), copy it into the official networks (map the names), and run the official loop with
   ``common.OfficialRun``: it feeds the official ``torch.randn`` (or numpy) calls the suite's
   draws, records after each official optimiser step (a post-step hook) the losses from the
   official frame's variables and the full state in the suite's names, and ends the loop after the
   last step. Patch the official code at run time only where it cannot run on a CPU or without its
   data, or to make its networks trace-sized (list each patch in the tracer's docstring and in
   ``meta["patches"]``); never change its arithmetic.
4. ``common.finish`` saves the trace, replays it on every engine path and writes the summary.
   Commit ``results/traces/NAME.pt`` and ``NAME.json``, add the tracer's command to the README's
   fidelity section, and add a mutation test to ``tests/test_traces.py``: one change of a loss
   weight, a detach point, a train/eval mode, an optimiser setting or the order of updates that the
   replay must reject.

Methods draw their training noise through :meth:`MethodContext.randn
<dfkd_bench.method_api.MethodContext.randn>` / ``randint`` / ``draw`` (and re-draw parameters through
``uniform_`` / ``normal_``: NAYER's generator), which the replay feeds from the trace
(:attr:`MethodContext.draws <dfkd_bench.method_api.MethodContext.draws>`); a method that draws
elsewhere needs a ``draws`` hook of the same kind before it can be traced.

May import: train, teachers, presets, store, config, runtime, method_api, models, data, errors.
"""
