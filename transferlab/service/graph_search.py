"""The Tune searcher that runs a study's trial graph as one Tune experiment (``driver.run_graph``)."""

from __future__ import annotations

from typing import Any

from ray.tune.search import Searcher

#: What a running ``GraphSearcher`` reads, by graph id: the driver's ``StudyRun``, the planned trials by
#: key and their configs. Kept out of the searcher, which Tune pickles with its run configuration.
GRAPHS: dict[str, tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]] = {}


class GraphSearcher(Searcher):
    """Hands Tune the study's trials in plan order, each once its base net has completed.

    The whole trial graph runs as one Tune experiment, so worker processes (torch imported, data and
    cached features loaded) are reused from base nets to transfer nets, and a transfer trial starts as
    soon as its own base net is done instead of when a whole level of the graph is. A trial whose base
    net failed, was skipped or cancelled is marked ``skipped`` with the reason and never runs.

    Args:
        graph: The key of this study's entry in ``GRAPHS``.
        keys: The trial keys to run, base nets before the trials that copy them.
    """

    def __init__(self, graph: str, keys: list[str]) -> None:
        super().__init__()
        self.graph, self.waiting = graph, list(keys)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next trial whose base net completed; None while the rest wait; FINISHED when none is left."""
        from transferlab.service.driver import skip_trial

        run, by_key, configs = GRAPHS[self.graph]
        for key in list(self.waiting):
            trial = by_key[key]
            base = run.status.get(trial.base_key) if trial.base_key is not None else "completed"
            if base in (None, "running"):
                continue  # its base net has not finished yet
            self.waiting.remove(key)
            if base == "completed":
                return {"trial": configs[key]}
            skip_trial(run, trial, f"base trial {trial.base_key} did not complete ({base})")
        return Searcher.FINISHED if not self.waiting else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Nothing to learn: the driver's ``StudyRun.status`` (its store callback's) says what finished."""
