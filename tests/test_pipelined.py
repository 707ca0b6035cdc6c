"""Pipelined rounds (pipelined.py): lossless at temperature 0 in every mode (tokens equal transformers'
via autoregressive decoding), on an emulated link with real overlap, and sampled frequencies equal the
target's exact marginals where the pre-draft replaces the bonus token and is post-verified."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from test_engine import GREEDY, _chi2, _tiny_vocab_model, load
from transformers import AutoModelForCausalLM

from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.cuda_streams import EmulatedLinkBackend
from offload_runtime.cuda_streams.backend import DONE
from offload_runtime.generate import generate_triforce
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings
from offload_runtime.errors import UserError
from offload_runtime.generate import generate_autoregressive
from offload_runtime.pipelined import PreDraft
from offload_runtime.policy import RoundChoice
from offload_runtime.sampler import Sampler
from offload_runtime.sampling import SamplingParams
from offload_runtime.stats import Stats


@pytest.fixture
def slabs_never_ready(monkeypatch):
    """Every layer reports its copy pending: each L3 pass pre-drafts all it may (deterministic)."""
    monkeypatch.setattr(FullCache, "layer_ready", lambda self, layer, n: False)
    monkeypatch.setattr(OffloadedCache, "layer_ready", lambda self, layer, n: False)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer, long_text):
    return tokenizer(long_text)["input_ids"][:301]


def pipelined(s: EngineSettings) -> EngineSettings:
    return EngineSettings(**{**vars(s), "pipeline": "on"})


SETTINGS = [
    EngineSettings(budget=48, chunk_size=8, gamma=4, draft_gamma=3, sinks=4, window=40),  # budget << prompt
    EngineSettings(budget=30, chunk_size=7, gamma=3, draft_gamma=2, sinks=2, window=24),  # generation > budget
    EngineSettings(budget=1024, chunk_size=16, gamma=5, draft_gamma=4, sinks=4, window=64),  # budget >= prompt
]


def test_greedy_equals_transformers_with_the_pipeline(checkpoint, prompt_ids, slabs_never_ready):
    path = checkpoint("llama", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)
    target = load(path)
    draft = load(checkpoint("llama", seed=11, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            num_key_value_heads=1))
    n_new = 30
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = ref.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n_new)[0, len(prompt_ids):]
    assert generate_autoregressive(target, prompt_ids, n_new, GREEDY, []).token_ids == hf.tolist()
    modes = [(SETTINGS[0], None), (SETTINGS[0], draft), (SETTINGS[1], draft), (SETTINGS[2], target)]
    for s, d in modes:  # two levels, a small draft, the target as its own draft; budget < and >= prompt
        got = generate_triforce(target, d, prompt_ids, n_new, GREEDY, [], pipelined(s))
        assert got.token_ids == hf.tolist(), (s, d is None)
        assert got.stats["draft_steps_overlapped"] > 0
        assert got.stats["predrafted_tokens_used"] + got.stats["predrafted_tokens_dropped"] > 0
    full = generate_triforce(target, None, prompt_ids, n_new, GREEDY, [], pipelined(SETTINGS[2]))
    assert full.stats["predrafted_tokens_used"] > 0 and full.stats["predrafted_tokens_dropped"] == 0


class GatedLink(EmulatedLinkBackend):
    """The emulated link (a real copy-engine thread), except that once `armed` its next copy-in waits until
    the host thread has taken a pre-draft step: each armed pass drafts while a copy is in flight, whatever
    the machine's load (a test waits on that state, not on the link being slower than compute)."""

    def __init__(self, link_gbps: float) -> None:
        super().__init__("cpu", link_gbps=link_gbps)
        self.armed, self.drafted = False, threading.Event()

    def copy(self, dst, src, kind, after=None):
        if self.armed and kind == "h2d":
            self.armed = False
            self.drafted.clear()
            after = _Gate(self.drafted, after)
        return super().copy(dst, src, kind, after)


class _Gate:
    """An `after` event: a pre-draft step (generous safety timeout: a missing step fails, never hangs), then `after`."""

    def __init__(self, drafted: threading.Event, after) -> None:
        self.drafted, self.after = drafted, after

    def synchronize(self) -> None:
        if not self.drafted.wait(120):
            raise TimeoutError("no pre-draft step while the copy-in waited")
        if self.after is not None and self.after is not DONE:
            self.after.synchronize()


def test_emulated_link_overlaps_and_keeps_tokens(checkpoint, prompt_ids, monkeypatch):
    """Real overlap: the copy engine streams slabs while the host thread drafts; tokens unchanged,
    the EOS and max-new-tokens cuts inside a block included. Every pass's first copy-in is held until
    the pre-draft has taken a step, so the overlap is there by construction, not by timing (what it
    saves is measured by bench/pipeline_bench.py)."""
    from offload_runtime.pipelined import PipelinedSpeculator

    target = load(checkpoint("llama", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2))
    ar = generate_autoregressive(target, prompt_ids, 30, GREEDY, []).token_ids
    link: list[GatedLink] = []
    step, round_ = PreDraft.step, PipelinedSpeculator.round

    def drafting(self):
        done = step(self)
        link[-1].drafted.set()
        return done

    def armed(self, *args):
        link[-1].armed = True
        return round_(self, *args)

    monkeypatch.setattr(PreDraft, "step", drafting)
    monkeypatch.setattr(PipelinedSpeculator, "round", armed)
    for n_new, eos in ((30, []), (30, [ar[11]]), (9, [])):
        link.append(GatedLink(link_gbps=0.02))
        try:  # (closed even on a failure: a copy-engine thread alive at exit can abort the interpreter)
            cache = OffloadedCache(target.cfg, "cpu", torch.float32, 400, 0, backend=link[-1])
            got = generate_triforce(target, None, prompt_ids, n_new, GREEDY, eos, pipelined(SETTINGS[2]), cache=cache)
        finally:
            link[-1].close()
        want = ar[:n_new] if not eos else ar[: ar.index(eos[0]) + 1]
        assert got.token_ids == want
        stats = got.stats  # a step in every pass, timed while its copy-in was held: hidden drafting
        assert stats["draft_steps_overlapped"] >= stats["l3_passes"] >= 1
        assert 0 < stats["time_overlapped_s"] <= stats["time_l2_s"]


def test_predraft_time_is_drafting_and_only_its_unhidden_steps_leave_the_pass(monkeypatch):
    """The timed L3 pass held the pre-draft: settle moves all of it to L2, takes out of L3 the steps after
    which no copy was in flight (they held the pass up), and counts the others as hidden ("overlap")."""
    class Chain:
        def __init__(self) -> None:
            self.tokens: list[int] = []

        def step(self, want: int) -> None:
            self.tokens.append(0)

    class Full:
        def __init__(self) -> None:
            self.answers = [True, False]  # a copy in flight after the first step, none after the second

        def copy_pending(self) -> bool:
            return self.answers.pop(0)

    clock = iter([0.0, 1.0, 1.0, 3.0])  # steps of 1 s and 2 s
    monkeypatch.setattr("offload_runtime.pipelined.time.perf_counter", lambda: next(clock))
    stats = Stats()
    stats.time["l2"], stats.time["l3"] = 0.5, 10.0  # the round's first drafting; the pass's wall time
    pre = PreDraft(Chain(), 2, stats, Full())
    assert [pre.step(), pre.step(), pre.step()] == [True, True, False]
    pre.settle()
    assert (stats.time["l2"], stats.time["l3"], stats.time["overlap"]) == (3.5, 8.0, 1.0)
    assert (stats.predraft_steps, stats.predraft_rounds, stats.predrafts_finished) == (2, 1, 1)


def test_pipelined_outcomes_tell_the_policy(checkpoint, prompt_ids, slabs_never_ready):
    """What the adaptive controller reads of a pipelined round: pipelined, the pre-draft complete, the
    x1 check one more proposal but not one more row of the pass."""
    from test_policy import Scripted
    target = load(checkpoint("llama", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2))
    policy = Scripted([RoundChoice(True, 3, 0)])
    session = Session(target, None, GREEDY, [], pipelined(SETTINGS[2]), policy=policy)  # budget >= prompt
    session.extend(prompt_ids)
    session.generate(13)
    assert len(policy.outcomes) == 3 and all(o.pipelined and o.predraft_finished for o in policy.outcomes)
    assert [(o.proposed, o.l3_rows) for o in policy.outcomes] == [(4, 4)] * 3  # every token and x1 accepted
    assert all(o.seconds["l3"] > 0 and o.seconds["overlap"] == 0.0 for o in policy.outcomes)  # no copies


def test_pipeline_flag_is_checked():
    with pytest.raises(UserError, match="--pipeline"):
        EngineSettings(pipeline="sometimes")


def test_verify_one_is_speculative_sampling():
    """One proposal ~ q checked against p: the emitted token is distributed as p (exact, by enumeration)."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    sampler = Sampler(SamplingParams(1.0), torch.Generator().manual_seed(0))
    counts = torch.zeros(4)
    draws = torch.multinomial(q, 20000, replacement=True, generator=torch.Generator().manual_seed(1))
    for x in draws.tolist():
        counts[sampler.verify_one(x, q, p)[1]] += 1
    stat, dof = _chi2(counts, p)
    assert stat < dof + 8 * math.sqrt(2 * dof)


def _marginals(target, prompt, vocab):
    """Exact marginals of the 2nd, 3rd and 4th generated tokens under the target (temperature 1)."""
    def dist(tokens):
        return torch.softmax(target(torch.tensor(tokens), FullCache(target.cfg, "cpu", torch.float32))[-1], -1)

    joint = dist(prompt)[:, None] * torch.stack([dist(prompt + [a]) for a in range(vocab)])  # [a, b]
    p3 = torch.zeros(vocab, vocab)  # [b, c]
    p4 = torch.zeros(vocab)
    for a in range(vocab):
        for b in range(vocab):
            pc = joint[a, b] * dist(prompt + [a, b])
            p3[b] += pc
            p4 += sum(pc[c] * dist(prompt + [a, b, c]) for c in range(vocab))
    return joint.sum(0), p3.sum(0), p4


def test_sampled_frequencies_match_target_with_the_pipeline(tmp_path, monkeypatch, slabs_never_ready):
    """Temperature 1, three levels, budget < prompt, gamma 1, 5 tokens: the 2nd is an ordinary
    verified proposal, the 3rd is the pre-draft's x1 in place of the bonus token, the 4th a carried
    pre-drafted token verified by the next pass. All three follow the target's exact marginals; with
    x1 accepted unverified (sabotage) the 3rd does not."""
    vocab = 6
    target = _tiny_vocab_model(tmp_path, 1, vocab, eos_token_id=None, bos_token_id=None)
    draft = _tiny_vocab_model(tmp_path, 2, vocab, eos_token_id=None, bos_token_id=None, num_hidden_layers=1)
    prompt = torch.randint(0, vocab, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    marginals = _marginals(target, prompt, vocab)
    settings = EngineSettings(budget=8, chunk_size=4, gamma=1, draft_gamma=1, sinks=2, window=12, pipeline="on")

    def frequencies(runs):  # one session, cut back to the prompt before each answer (one prefill)
        session = Session(target, draft, SamplingParams(1.0), [], settings, torch.Generator().manual_seed(1),
                          capacity=len(prompt) + 16)
        session.extend(prompt)
        counts = torch.zeros(3, vocab)
        for _ in range(runs):
            session.truncate(len(prompt))
            out = session.generate(5)
            for i in range(3):
                counts[i, out.token_ids[i + 1]] += 1
        return counts, out.stats

    counts, stats = frequencies(600)
    assert stats["predrafted_tokens_used"] >= 1
    for i in range(3):
        stat, dof = _chi2(counts[i], marginals[i])
        assert stat < dof + 8 * math.sqrt(2 * dof), (i, stat, dof)
    monkeypatch.setattr(Sampler, "verify_one", lambda self, x, q, p: (True, x))
    counts, _ = frequencies(400)
    stat, dof = _chi2(counts[1], marginals[1])
    assert stat > dof + 8 * math.sqrt(2 * dof), (stat, dof)
