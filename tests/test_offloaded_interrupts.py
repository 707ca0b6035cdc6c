"""Interrupts with the cache host-resident (issue 27): Ctrl-C inside an L3 pass of a pipelined round on
the emulated link (a layer's write-back issued, the next layer's copy awaited) leaves a chat whose next
answers are the target's; and --pipeline auto switches pipelining on exactly when the full cache is
offloaded (asserted from the statistics). Pre-draft steps are made deterministic by reporting every
slab as not ready yet (layer_ready False); the copies themselves still run on the copy-engine thread.
The server's stop strings and cancellation on this cache: tests/test_serve_behaviour.py."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from offload_runtime import loading, synthetic, trained
from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.chat import ChatSession
from offload_runtime.cuda_streams import EmulatedLinkBackend
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings
from offload_runtime.generate import generate_autoregressive
from offload_runtime.pipelined import PreDraft
from offload_runtime.run import main
from offload_runtime.sampling import SamplingParams

GREEDY = SamplingParams(0.0)
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(autouse=True, scope="module")
def tiny_models_on_one_thread():
    """64-wide matmuls: a second thread only waits for a core on a busy machine (trained.one_thread)."""
    with trained.one_thread():
        yield


@pytest.fixture
def link():
    """An emulated 0.05 GB/s link, closed even when the test fails: a copy-engine thread still alive at
    the interpreter's exit can abort it ("terminate called without an active exception")."""
    backend = EmulatedLinkBackend("cpu", link_gbps=0.05)
    yield backend
    backend.close()


@pytest.fixture
def slabs_never_ready(monkeypatch):
    """Every layer reports its copy pending: each L3 pass pre-drafts all it may (deterministic)."""
    monkeypatch.setattr(FullCache, "layer_ready", lambda self, layer, n: False)
    monkeypatch.setattr(OffloadedCache, "layer_ready", lambda self, layer, n: False)


def answered_from(session: Session, turn) -> list[int]:
    """The target's greedy continuation of the context the turn's answer started from."""
    before = session.context[:len(session.context) - len(turn.token_ids)]
    return generate_autoregressive(session.target, before, 12, GREEDY, []).token_ids


def test_ctrl_c_inside_a_pipelined_pass_keeps_the_chat(checkpoint, link, slabs_never_ready, monkeypatch):
    target = loading.load(str(checkpoint("llama", eos_token_id=None)), torch.device("cpu"))
    draft = loading.load(str(checkpoint("llama", seed=3, eos_token_id=None, **SMALL)), torch.device("cpu"))
    cache = OffloadedCache(target.model.cfg, "cpu", torch.float32, 1024, 0, backend=link)
    settings = EngineSettings(budget=32, chunk_size=4, gamma=3, draft_gamma=2, sinks=4, window=64, pipeline="auto")
    session = Session(target.model, draft.model, GREEDY, [], settings, cache=cache)
    assert session.pipelined  # auto: on, the full cache is host-resident
    chat = ChatSession(session, target.tokenizer, synthetic.synthetic_text(60, seed=2), max_new_tokens=12)
    step, passes, complete = PreDraft.step, [], []

    def ctrl_c_in_the_second_pass_at_layer_1(self):
        """A layer waits, the pre-draft is complete: the first such call is layer 0's, the second layer 1's."""
        passes.append(self) if self not in passes else None
        if len(passes) == 2 and len(self.chain.tokens) >= self.want:
            complete.append(self)
            if len(complete) == 2:  # layer 0 computed, its rows being written back; layer 1's copy awaited
                raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(PreDraft, "step", ctrl_c_in_the_second_pass_at_layer_1)
    first = chat.ask("What is it about?")
    assert complete and first.interrupted and 1 <= len(first.token_ids) < 12
    assert first.token_ids == answered_from(session, first)[:len(first.token_ids)]
    second = chat.ask("And then?")  # the partial answer stays in the conversation; the next turn is whole
    assert not second.interrupted and second.token_ids == answered_from(session, second)
    assert second.stats["draft_steps_overlapped"] > 0 and second.stats["offloaded_layers"] == 2


def cli_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv + ["--json"]) == 0
    return json.loads(out.getvalue())


def test_pipeline_auto_is_on_exactly_when_the_cache_is_host_resident(checkpoint, slabs_never_ready):
    """The CLI with --pipeline auto (the default): pre-draft steps over the emulated link, none with the
    cache on the device or with --pipeline off; the same tokens in all three."""
    common = ["--model", str(checkpoint("llama", eos_token_id=None)), "--prompt", synthetic.synthetic_text(40),
              "--max-new-tokens", "10", "--gamma", "3", "--budget", "16", "--chunk-size", "4", "--device", "cpu"]
    out = {"emulated": cli_json(common + ["--emulate-link", "0.5"]), "device": cli_json(common),
           "off": cli_json(common + ["--emulate-link", "0.5", "--pipeline", "off"])}
    assert out["emulated"]["token_ids"] == out["device"]["token_ids"] == out["off"]["token_ids"]
    runs = {name: o["stats"] for name, o in out.items()}
    assert runs["emulated"]["offload_backend"] == "emulated" and "offload_backend" not in runs["device"]
    assert runs["emulated"]["draft_steps_overlapped"] > 0
    assert runs["device"]["draft_steps_overlapped"] == runs["off"]["draft_steps_overlapped"] == 0
