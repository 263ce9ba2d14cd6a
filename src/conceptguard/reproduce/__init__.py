"""``conceptguard reproduce``: re-run the papers' headline experiments on the embedded world and
judge each claim from the measured numbers.

One module per claim (:mod:`~conceptguard.reproduce.esd`, :mod:`~conceptguard.reproduce.sdd`,
:mod:`~conceptguard.reproduce.guard`, :mod:`~conceptguard.reproduce.immunize`,
:mod:`~conceptguard.reproduce.attacks`), each an :class:`~conceptguard.reproduce.common.Experiment`
with a quick and a full profile; :func:`~conceptguard.reproduce.runner.reproduce` runs them, caches
their results and writes ``docs/results.md`` and the HTML report::

    from conceptguard.reproduce import reproduce
    summary = reproduce("runs/reproduce", profile="quick", seed=0, only=["esd"])
"""

from __future__ import annotations

from conceptguard._lazy import lazy_exports

_EXPORTS = {
    "Check": "conceptguard.reproduce.common",
    "Experiment": "conceptguard.reproduce.common",
    "Table": "conceptguard.reproduce.common",
    "World": "conceptguard.reproduce.common",
    "experiments": "conceptguard.reproduce.runner",
    "reproduce": "conceptguard.reproduce.runner",
    "render_results": "conceptguard.reproduce.markdown",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
