"""Counters and timers of a session, and one answer's statistics (differences against a mark)."""
from __future__ import annotations

import time
from typing import Any


class Stats:
    def __init__(self) -> None:
        self.l3_passes = self.l3_proposed = self.l3_accepted = self.emitted_in_rounds = 0
        self.l2_forwards = self.l1_forwards = self.l1_proposed = self.l1_accepted = 0
        self.l2_rows = self.l1_rejections = 0  # L2 query rows; L2 checks stopped by a rejection (adaptive.py)
        self.l3_rows = 0  # L3 query rows (a pipelined round's x1 is one more proposal verified, not one more row)
        self.prefilled_tokens = self.prefills = self.retrieval_builds = 0
        self.restored_tokens = 0  # context rows read from the KV store (kv_store.py) instead of prefilled
        self.predraft_steps = self.predraft_used = self.predraft_dropped = 0  # pipelined rounds
        self.predraft_rounds = self.predrafts_finished = 0  # pipelined rounds; those whose pre-draft was complete
        self.rounds_all_accepted = 0  # rounds whose every proposal L3 accepted (a pre-draft is used only then)
        # l2 includes l1; in pipelined rounds l2 includes the pre-draft, l3 is the pass's own time (its wall
        # time less the drafting that did not fill a copy wait), "overlap" the drafting hidden in its waits:
        # the rounds' wall time is l2 + l3 - overlap.
        self.time = {"l1": 0.0, "l2": 0.0, "l3": 0.0, "prefill": 0.0, "overlap": 0.0}

    def snapshot(self) -> dict:
        """The counters now (a mark to measure one answer from)."""
        return dict(vars(self), time=dict(self.time))

    def since(self, mark: dict) -> Stats:
        """The counters accumulated after `mark`."""
        delta = Stats()
        for key, value in vars(self).items():
            if key == "time":
                delta.time = {k: v - mark["time"][k] for k, v in value.items()}
            else:
                setattr(delta, key, value - mark[key])
        return delta

    def as_dict(self) -> dict:
        return {
            "l3_passes": self.l3_passes,
            "mean_accepted_per_pass": self.emitted_in_rounds / self.l3_passes if self.l3_passes else None,
            "l3_acceptance_of_l2": self.l3_accepted / self.l3_proposed if self.l3_proposed else None,
            "l2_acceptance_of_l1": self.l1_accepted / self.l1_proposed if self.l1_proposed else None,
            "l2_forwards": self.l2_forwards,
            "l1_forwards": self.l1_forwards,
            "time_l1_s": self.time["l1"], "time_l2_s": self.time["l2"], "time_l3_s": self.time["l3"],
            "time_overlapped_s": self.time["overlap"],
            "prefilled_tokens": self.prefilled_tokens,
            "restored_tokens": self.restored_tokens,
            "prefills": self.prefills,
            "retrieval_builds": self.retrieval_builds,
            "rounds_all_accepted": self.rounds_all_accepted,
            "draft_steps_overlapped": self.predraft_steps,
            "predrafted_tokens_used": self.predraft_used,
            "predrafted_tokens_dropped": self.predraft_dropped,
        }


def answer_stats(delta: Stats, mode: str, context_tokens: int, new_tokens: int, decode_start: float) -> dict:
    """Statistics of one answer (its prefill included) from the counters it added."""
    now = time.perf_counter()
    stats = {
        "mode": mode,
        "prompt_tokens": context_tokens - new_tokens,
        "new_tokens": new_tokens,
        "prefill_s": delta.time["prefill"],
        "decode_s": now - decode_start,
        "decode_tokens_per_s": new_tokens / (now - decode_start) if now > decode_start else None,
        "context_tokens": context_tokens,
    }
    stats.update(delta.as_dict())
    if mode == "autoregressive":
        for key in ("mean_accepted_per_pass", "l3_acceptance_of_l2", "l2_acceptance_of_l1"):
            stats[key] = None
        stats["target_forwards"] = delta.l3_passes + delta.prefills
    return stats


class timed:
    """`with timed(stats, "l3"):` adds the block's wall time to stats.time["l3"]."""

    def __init__(self, stats: Stats, level: str) -> None:
        self.stats, self.level = stats, level

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.stats.time[self.level] += time.perf_counter() - self.t
