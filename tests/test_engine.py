"""The TriForce engine: lossless at temperature 0 (tokens equal autoregressive decoding and
transformers' generate), real speculation visible in stats, sampled frequencies equal the
target's exact distributions, and its bad inputs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_runtime import loading, synthetic
from offload_runtime.caches import FullCache
from offload_runtime.generate import generate_triforce
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings
from offload_runtime.errors import UserError
from offload_runtime.generate import generate_autoregressive
from offload_runtime.run import main
from offload_runtime.sampling import SamplingParams

GREEDY = SamplingParams(0.0)
TARGETS = {
    "llama": ("llama", dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)),
    "mistral": ("mistral", dict(num_key_value_heads=4)),
    "qwen2": ("qwen2", dict(num_key_value_heads=1)),
}


def load(path):
    return loading.load(str(path), torch.device("cpu"), with_tokenizer=False).model


@pytest.fixture(scope="module")
def prompt_ids(tokenizer, long_text):
    return tokenizer(long_text)["input_ids"][:301]  # not a multiple of any chunk size used below


@pytest.fixture(scope="module")
def draft_model(checkpoint):
    return load(checkpoint("llama", seed=11, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1))


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_greedy_equals_autoregressive_and_transformers(family, checkpoint, prompt_ids, draft_model):
    model_type, overrides = TARGETS[family]
    path = checkpoint(model_type, **overrides)
    target = load(path)
    n_new = 40
    ar = generate_autoregressive(target, prompt_ids, n_new, GREEDY, []).token_ids
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = ref.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n_new)[0, len(prompt_ids):]
    assert ar == hf.tolist()
    settings = [
        EngineSettings(budget=48, chunk_size=8, gamma=4, draft_gamma=3, sinks=4, window=40),  # budget << prompt
        EngineSettings(budget=30, chunk_size=7, gamma=3, draft_gamma=2, sinks=2, window=24),  # generation > budget
        EngineSettings(budget=1024, chunk_size=16, gamma=5, draft_gamma=4, sinks=4, window=64),  # budget >= prompt
        EngineSettings(budget=48, chunk_size=8, sinks=4, window=40),  # the adaptive controller (the default)
    ]
    for s in settings:
        for draft in (None, draft_model, target):  # two levels, a small draft, the target as its own draft
            got = generate_triforce(target, draft, prompt_ids, n_new, GREEDY, [], s)
            assert got.token_ids == ar, (s, draft is None)
            assert got.stats["new_tokens"] == n_new


def test_eos_inside_accepted_block_ends_there(checkpoint, prompt_ids):
    target = load(checkpoint("llama"))
    ar = generate_autoregressive(target, prompt_ids, 30, GREEDY, []).token_ids
    i = next(i for i in range(5, 30) if ar[i] not in ar[:i])
    settings = EngineSettings(budget=4096, gamma=6)  # everything accepted: EOS falls inside a block
    got = generate_triforce(target, None, prompt_ids, 30, GREEDY, [ar[i]], settings)
    assert got.token_ids == ar[: i + 1]
    got = generate_triforce(target, None, prompt_ids, 7, GREEDY, [], settings)
    assert got.token_ids == ar[:7]  # max-new-tokens inside a block


@pytest.mark.parametrize("n_new,gamma", [(30, 6), (29, 4), (8, 7)])
def test_full_budget_accepts_every_token(checkpoint, prompt_ids, n_new, gamma):
    """Budget >= prompt: L2 is L3, so every pass accepts all gamma tokens plus the bonus."""
    target = load(checkpoint("llama"))
    got = generate_triforce(target, None, prompt_ids, n_new, GREEDY, [], EngineSettings(budget=4096, gamma=gamma))
    # the first token comes from the prefill; each L3 pass then yields gamma + 1 tokens
    assert got.stats["l3_passes"] == math.ceil((n_new - 1) / (gamma + 1)) <= math.ceil(n_new / (gamma + 1))
    assert got.stats["l3_acceptance_of_l2"] == 1.0
    # a sampled run is accepted in full too (p == q up to float rounding)
    sampled = generate_triforce(target, None, prompt_ids, n_new, SamplingParams(1.0), [],
                                EngineSettings(budget=4096, gamma=gamma), torch.Generator().manual_seed(0))
    assert sampled.stats["l3_passes"] == math.ceil((n_new - 1) / (gamma + 1))


def test_target_as_own_draft_short_prompt_accepts_all(checkpoint, prompt_ids):
    """Prompt inside the draft window and budget: all three levels compute the same thing."""
    target = load(checkpoint("llama"))
    got = generate_triforce(target, target, prompt_ids[:50], 30, GREEDY, [], EngineSettings(budget=4096, gamma=6,
                                                                                         draft_gamma=4))
    assert got.stats["l2_acceptance_of_l1"] == 1.0 and got.stats["l3_acceptance_of_l2"] == 1.0


@pytest.mark.parametrize("policy", [dict(refresh_every=2), dict(refresh_below=0.9)])
def test_refresh_policy_keeps_tokens(checkpoint, prompt_ids, draft_model, policy):
    target = load(checkpoint("llama"))
    ar = generate_autoregressive(target, prompt_ids, 25, GREEDY, []).token_ids
    s = EngineSettings(budget=48, chunk_size=8, gamma=3, draft_gamma=2, sinks=4, window=40, **policy)
    got = generate_triforce(target, draft_model, prompt_ids, 25, GREEDY, [], s)
    assert got.token_ids == ar
    assert got.stats["retrieval_builds"] >= 2  # the prefill's selection, then at least one rebuild
    off = generate_triforce(target, draft_model, prompt_ids, 25, GREEDY, [],
                            EngineSettings(budget=48, chunk_size=8, gamma=3, draft_gamma=2, sinks=4, window=40))
    assert off.stats["retrieval_builds"] == 1  # off by default


def _tiny_vocab_model(tmp_path, seed, vocab=8, **kw):
    cfg = synthetic.hf_config("llama", vocab, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    synthetic.randomize(model, std=0.5, seed=seed)
    model.save_pretrained(tmp_path / f"m{seed}")
    return load(tmp_path / f"m{seed}")


def _chi2(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum().item(), int(keep.sum()) - 1


@pytest.mark.parametrize("controller", ["fixed gamma", "adaptive"])
def test_sampled_frequencies_match_target(tmp_path, controller):
    """Temperature 1, three levels, retrieval budget < prompt, draft window < prompt: the second and third
    generated tokens (produced by speculation) follow the target's exact marginal distributions. Adaptive:
    one session answers every run, so its controller's choices change between runs."""
    vocab = 8
    target = _tiny_vocab_model(tmp_path, 1, vocab, eos_token_id=None, bos_token_id=None)
    draft = _tiny_vocab_model(tmp_path, 2, vocab, eos_token_id=None, bos_token_id=None, num_hidden_layers=1)
    prompt = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(1.0)

    def dist(tokens):
        return torch.softmax(target(torch.tensor(tokens), FullCache(target.cfg, "cpu", torch.float32))[-1], -1)

    p1 = dist(prompt)
    p2_given = torch.stack([dist(prompt + [a]) for a in range(vocab)])  # [a, b]
    joint12 = p1[:, None] * p2_given
    p3 = sum(joint12[a, b] * dist(prompt + [a, b]) for a in range(vocab) for b in range(vocab))
    p2 = joint12.sum(0)

    gen = torch.Generator().manual_seed(1)
    runs = 2500
    seconds = torch.zeros(vocab)
    thirds = torch.zeros(vocab)
    if controller == "adaptive":
        session = Session(target, draft, params, [], EngineSettings(budget=16, chunk_size=4, sinks=2, window=12), gen)
        session.extend(prompt)
    for _ in range(runs):
        if controller == "adaptive":
            session.truncate(len(prompt))
            out = session.generate(3).token_ids
        else:
            settings = EngineSettings(budget=16, chunk_size=4, gamma=2, draft_gamma=2, sinks=2, window=12)
            out = generate_triforce(target, draft, prompt, 3, params, [], settings, gen).token_ids
        seconds[out[1]] += 1
        thirds[out[2]] += 1
    if controller == "adaptive":  # the controller did speculate (probes at least) and stepped autoregressively
        report = session.policy.report()
        assert report["rounds"]["autoregressive"] > 0 and report["gamma_histogram"].get(1, 0) > 0, report
    for counts, probs in [(seconds, p2), (thirds, p3)]:
        stat, dof = _chi2(counts, probs)
        assert stat < dof + 8 * math.sqrt(2 * dof), (stat, dof)  # ~p < 1e-6 under the right law
    # the same check does fail when the law is wrong: the draft's distribution is far from p2
    wrong = torch.softmax(draft(torch.tensor(prompt + [0]), FullCache(draft.cfg, "cpu", torch.float32))[-1], -1)
    stat, dof = _chi2(seconds, (0.5 * wrong + 0.5 * p2))
    assert stat > dof + 8 * math.sqrt(2 * dof)


def test_vocabulary_mismatch_is_refused(checkpoint, tmp_path, capsys):
    target = checkpoint("llama")
    other_tok = synthetic.train_tokenizer(vocab_size=300, seed=5)
    other = synthetic.make_checkpoint(tmp_path / "other", "llama", tokenizer=other_tok)
    assert main(["--model", str(target), "--draft", str(other), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "vocabular" in err[0]


@pytest.mark.parametrize("flags,needle", [
    (["--budget", "8", "--chunk-size", "8"], "at least 2 chunks"),
    (["--chunk-size", "0"], "--chunk-size must be positive"),
    (["--gamma", "0"], "--gamma must be positive"),
])
def test_bad_engine_settings(checkpoint, capsys, flags, needle):
    assert main(["--model", str(checkpoint("llama")), "--prompt", "x"] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    with pytest.raises(UserError):
        EngineSettings(budget=8, chunk_size=8)


def test_cli_triforce_json_stats(checkpoint, capsys, tokenizer):
    path = str(checkpoint("qwen2"))
    args = ["--model", path, "--prompt", synthetic.synthetic_text(200, 3), "--max-new-tokens", "24", "--json",
            "--budget", "64", "--chunk-size", "8", "--gamma", "4"]
    assert main(args + ["--draft", path]) == 0
    tri = json.loads(capsys.readouterr().out)
    assert main(args + ["--mode", "autoregressive"]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert tri["token_ids"] == ar["token_ids"] and tri["text"] == ar["text"]
    stats = tri["stats"]
    n, passes = len(tri["token_ids"]), stats["l3_passes"]
    assert n == 24 and stats["levels"] == 3 and passes >= 1
    # values, not presence: the first token comes from the prefill, each other from an L3 pass, which emits
    # its accepted proposals and one token of its own; what the passes proposed is the controller's histogram
    proposed = sum(int(g) * k for g, k in stats["adaptive"]["gamma_histogram"].items())
    assert stats["mean_accepted_per_pass"] == pytest.approx((n - 1) / passes)
    assert stats["l3_acceptance_of_l2"] == pytest.approx((n - 1 - passes) / proposed)
    # (random weights and a draft window below the prompt: L2 may accept no L1 token here; its value is checked
    # where it is known, test_target_as_own_draft_short_prompt_accepts_all)
    assert stats["l1_forwards"] > 0 and 0 <= stats["l2_acceptance_of_l1"] <= 1
    assert stats["time_l2_s"] >= stats["time_l1_s"] > 0 and stats["time_l3_s"] > 0 and stats["prefill_s"] > 0
    assert stats["decode_tokens_per_s"] == pytest.approx(n / stats["decode_s"], rel=1e-3)
    rounds = stats["adaptive"]["rounds"]  # --gamma 4: never an autoregressive step; the draft gamma is chosen
    assert set(rounds) <= {"speculative", "probe"} and sum(rounds.values()) == stats["l3_passes"]
    assert main(args[:-2] + ["--draft", path, "--gamma", "auto", "--draft-gamma", "auto"]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["token_ids"] == ar["token_ids"] and auto["stats"]["adaptive"]["rounds"]["autoregressive"] >= 1


def test_draft_with_padded_vocabulary(checkpoint, prompt_ids, tokenizer):
    """Draft vocab_size larger than the target's (padding rows): proposals stay within the target's ids."""
    target = load(checkpoint("llama"))
    draft = load(checkpoint("llama", seed=4, vocab_size=len(tokenizer) + 16))
    assert draft.cfg.vocab_size == target.cfg.vocab_size + 16
    ar = generate_autoregressive(target, prompt_ids, 20, GREEDY, []).token_ids
    s = EngineSettings(budget=48, chunk_size=8, gamma=3, draft_gamma=2, sinks=4, window=40)
    assert generate_triforce(target, draft, prompt_ids, 20, GREEDY, [], s).token_ids == ar
    sampled = generate_triforce(target, draft, prompt_ids, 20, SamplingParams(1.0), [], s,
                                torch.Generator().manual_seed(0)).token_ids
    assert max(sampled) < target.cfg.vocab_size


def test_caches_grow_past_their_first_allocation(checkpoint, prompt_ids, draft_model):
    """The L2 cache outgrows its first allocation during a forward, the L1 cache during a long new turn;
    both are then written between forwards (rows from the L3 pass, evictions)."""
    target = load(checkpoint("llama"))
    ar = generate_autoregressive(target, prompt_ids, 260, GREEDY, []).token_ids
    s = EngineSettings(budget=64, chunk_size=8, gamma=4, draft_gamma=3, sinks=4, window=300)
    assert generate_triforce(target, None, prompt_ids, 260, GREEDY, [], s).token_ids == ar
    session = Session(target, draft_model, GREEDY, [], s)
    session.extend(prompt_ids[:40])
    first = session.generate(8).token_ids
    session.extend(prompt_ids[40:320])  # 280 new tokens through the draft's 300-row window
    second = session.generate(8).token_ids
    context = prompt_ids[:40] + first + prompt_ids[40:320]
    assert first == generate_autoregressive(target, prompt_ids[:40], 8, GREEDY, []).token_ids
    assert second == generate_autoregressive(target, context, 8, GREEDY, []).token_ids


def test_eos_inside_a_block_then_a_new_turn(checkpoint, prompt_ids):
    """An answer that ends at an EOS inside an accepted block leaves no rows of the tokens after it."""
    target = load(checkpoint("llama"))
    ar = generate_autoregressive(target, prompt_ids, 30, GREEDY, []).token_ids
    i = next(i for i in range(2, 30) if ar[i] not in ar[:i] and (i % 7) not in (0, 6))
    session = Session(target, None, GREEDY, [ar[i]], EngineSettings(budget=4096, gamma=6))
    session.extend(prompt_ids)
    assert session.generate(30).token_ids == ar[: i + 1]
    assert session.full.length == len(session.context) - 1 == session.retrieval.length
    follow = prompt_ids[:3]
    session.extend(follow)
    want = generate_autoregressive(target, prompt_ids + ar[: i + 1] + follow, 10, GREEDY, [ar[i]]).token_ids
    assert session.generate(10).token_ids == want


def test_switching_to_triforce_after_a_prefill(checkpoint, prompt_ids, draft_model):
    target = load(checkpoint("llama"))
    ar = generate_autoregressive(target, prompt_ids, 12, GREEDY, []).token_ids
    session = Session(target, None, GREEDY, [], EngineSettings(budget=64, gamma=3, draft_gamma=2, sinks=4,
                                                                window=40), mode="autoregressive")
    session.extend(prompt_ids)
    session.use("triforce", draft_model)
    assert session.generate(12).token_ids == ar


def test_session_recovers_from_an_interrupted_prefill_and_a_long_truncate(checkpoint, prompt_ids):
    target = load(checkpoint("llama"))
    want = generate_autoregressive(target, prompt_ids[:40], 6, GREEDY, []).token_ids

    def stop_at_the_end(done, total):
        if done == total:
            raise KeyboardInterrupt  # after the last chunk: the cache holds the context, the logits are lost

    session = Session(target, None, GREEDY, [], EngineSettings(budget=64, gamma=3), progress=stop_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        session.extend(prompt_ids[:40])
    session.progress = None
    assert session.generate(6).token_ids == want
    session.truncate(40)
    session.truncate(500)  # longer than the context: nothing to cut, still consistent
    assert session.generate(6).token_ids == want


def test_gamma_is_bounded_by_the_kept_query_rows():
    with pytest.raises(UserError, match="--gamma must be below 64"):
        EngineSettings(gamma=64)


def acceptance_estimate(outcomes: list, forget: float = 0.95) -> float:
    """The controller's Beta(1, 1) acceptance estimate written out over the n rounds that proposed:
    (sum_i f^(n-1-i) a_i + 1) / (sum_i f^(n-1-i) t_i + 2), t_i = a_i + 1 when a rejection ended chain i."""
    rounds = [(o.accepted, o.accepted + int(o.accepted < o.proposed)) for o in outcomes if o.proposed]
    weights = [forget ** (len(rounds) - 1 - i) for i in range(len(rounds))]
    successes = sum(w * a for w, (a, _) in zip(weights, rounds))
    return (successes + 1) / (sum(w * t for w, (_, t) in zip(weights, rounds)) + 2)


def controller_run(target, draft, prompt_ids, monkeypatch) -> tuple:
    """A generation with the default controller: (result, the round outcomes the session reported to it)."""
    from offload_runtime.adaptive import AdaptiveSpeculation

    outcomes, observe = [], AdaptiveSpeculation.observe
    monkeypatch.setattr(AdaptiveSpeculation, "observe", lambda self, o: (outcomes.append(o), observe(self, o))[1])
    got = generate_triforce(target, draft, prompt_ids, 30, GREEDY, [], EngineSettings(budget=48, sinks=4, window=40))
    return got, outcomes


def test_controller_is_on_by_default_and_reports(checkpoint, prompt_ids, draft_model, monkeypatch):
    target = load(checkpoint("llama"))
    assert EngineSettings().gamma is None and EngineSettings().draft_gamma is None
    got, outcomes = controller_run(target, draft_model, prompt_ids, monkeypatch)
    assert got.token_ids == generate_autoregressive(target, prompt_ids, 30, GREEDY, []).token_ids
    report = got.stats["adaptive"]
    assert sum(report["rounds"].values()) == sum(report["gamma_histogram"].values()) == len(outcomes) >= 1
    assert report["rounds"]["autoregressive"] >= 1  # the warm-up step measures the baseline
    # the outcomes are the engine's rounds, and the reported estimate is computed from them
    assert sum(o.accepted for o in outcomes) / sum(o.proposed for o in outcomes) == got.stats["l3_acceptance_of_l2"]
    assert report["estimates"]["l3_acceptance_of_l2"] == pytest.approx(acceptance_estimate(outcomes), rel=1e-9)


def test_estimate_check_catches_an_estimate_that_never_learns(checkpoint, prompt_ids, draft_model, monkeypatch):
    """Sabotage: acceptance never observed (the estimate stays at its prior, 0.5). The old check, an
    estimate in [0, 1], passed; the estimate written out over the rounds does not."""
    from offload_runtime.estimates import Acceptance

    monkeypatch.setattr(Acceptance, "observe", lambda self, accepted, rejections: None)
    got, outcomes = controller_run(load(checkpoint("llama")), draft_model, prompt_ids, monkeypatch)
    reported = got.stats["adaptive"]["estimates"]["l3_acceptance_of_l2"]
    assert 0 <= reported <= 1 and reported != pytest.approx(acceptance_estimate(outcomes), rel=1e-9)
