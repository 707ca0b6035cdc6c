"""The KV store (kv_store.py): a restored prefix gives the tokens a cold prefill gives (and
transformers'), in every engine mode and with the cache host-resident; every bad entry (a flipped
byte, a truncated file, another model's block, another format) is caught, skipped with one
warning and prefilled cold; writes are atomic; a full disk is a warning; the store keeps its size."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_runtime import kv_blocks, kv_store, trained
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.cuda_streams import EmulatedLinkBackend
from offload_runtime.kv_store import BLOCK, KVStore
from offload_runtime.sampling import SamplingParams
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings

N_NEW = 12
SETTINGS = EngineSettings(budget=48, chunk_size=8, gamma=6, draft_gamma=3, sinks=4, window=64)


@pytest.fixture(scope="module", autouse=True)
def tiny_model_on_one_thread():
    with trained.one_thread():
        yield


@pytest.fixture(scope="module")
def pair(trained_pair):
    target, draft = trained_pair
    return target.model, draft.model, target.tokenizer


@pytest.fixture(scope="module")
def story(pair):
    ids = pair[2](trained.story_prompt())["input_ids"]
    assert BLOCK < len(ids) - 1 < 2 * BLOCK  # one whole block is stored, the rest is prefilled
    return ids


@pytest.fixture(scope="module")
def reference(story):
    ref = AutoModelForCausalLM.from_pretrained(trained.TARGET, dtype=torch.float32).eval()
    return ref.generate(torch.tensor([story]), do_sample=False, max_new_tokens=N_NEW)[0, len(story):].tolist()


def answer(pair, story, store, mode="triforce-3"):
    """(tokens, stats) of one greedy answer to `story` with `store` attached."""
    target, draft, _ = pair
    cache = None
    if mode == "offloaded":
        cache = OffloadedCache(target.cfg, "cpu", torch.float32, len(story) + N_NEW + 8, 0,
                               backend=EmulatedLinkBackend("cpu", link_gbps=0.5))
    session = Session(target, draft if mode != "autoregressive" else None, SamplingParams(), [], SETTINGS,
                      torch.Generator(), "autoregressive" if mode == "autoregressive" else "triforce",
                      cache=cache, capacity=len(story) + N_NEW + 8, kv_store=store)
    session.extend(story)
    result = session.generate(N_NEW)
    return result.token_ids, result.stats


def store_for(pair, path, warnings=None, **kw) -> KVStore:
    return KVStore(path, pair[0], warn=(warnings.append if warnings is not None else kv_store._warn), **kw)


@pytest.mark.parametrize("mode", ["autoregressive", "triforce-3", "offloaded"])
def test_restored_prefix_gives_the_cold_tokens(pair, story, reference, tmp_path, mode):
    cold, cold_stats = answer(pair, story, store_for(pair, tmp_path), mode)
    assert cold == reference and cold_stats["restored_tokens"] == 0
    warnings: list[str] = []
    warm, warm_stats = answer(pair, story, store_for(pair, tmp_path, warnings), mode)  # a restart
    assert warm == reference and not warnings
    assert warm_stats["restored_tokens"] == BLOCK
    assert warm_stats["prefilled_tokens"] == len(story) - BLOCK


def test_longer_document_reuses_the_shared_blocks(pair, story, reference, tmp_path):
    store = store_for(pair, tmp_path)
    assert answer(pair, story[: BLOCK + 3], store)[1]["restored_tokens"] == 0  # block 0 saved
    tokens, stats = answer(pair, story, store_for(pair, tmp_path))
    assert stats["restored_tokens"] == BLOCK and tokens == reference
    other = story[:100] + [t + 1 for t in story[100:]]  # another document from token 100 on: no block shared
    assert store_for(pair, tmp_path).cached_prefix(other) == 0


def _one_block(pair, story, path) -> Path:
    answer(pair, story, store_for(pair, path))
    (block,) = list(Path(path).glob(f"v*/*/*{kv_store.SUFFIX}"))
    return block


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _other_format(p: Path) -> None:
    data = p.read_bytes()
    n = int.from_bytes(data[len(kv_blocks.MAGIC):len(kv_blocks.MAGIC) + 8], "little")
    start = len(kv_blocks.MAGIC) + 8
    header = json.loads(data[start:start + n])
    header["format"] = kv_store.FORMAT + 1
    new = json.dumps(header).encode()
    p.write_bytes(kv_blocks.MAGIC + len(new).to_bytes(8, "little") + new + data[start + n:])


@pytest.mark.parametrize("damage, why", [(_flip_last_byte, "checksum mismatch"), (_truncate, "truncated"),
                                         (_other_format, "format"), (lambda p: p.write_bytes(b"junk"), "not a block")])
def test_a_bad_block_is_skipped_with_a_warning_and_prefilled_cold(pair, story, reference, tmp_path, damage, why):
    """Sabotage of each check: the damaged file is caught, deleted, and the answer is still exact."""
    block = _one_block(pair, story, tmp_path)
    damage(block)
    warnings: list[str] = []
    tokens, stats = answer(pair, story, store_for(pair, tmp_path, warnings))
    assert tokens == reference and stats["restored_tokens"] == 0 and stats["prefilled_tokens"] == len(story)
    assert len(warnings) == 1 and why in warnings[0], warnings
    assert block.exists()  # re-saved whole by this cold prefill
    assert answer(pair, story, store_for(pair, tmp_path))[1]["restored_tokens"] == BLOCK


def test_another_models_block_is_refused(pair, story, reference, tmp_path, checkpoint):
    """A swapped model: the weights digest tells them apart, and a block of another model placed in
    this model's folder (a collision, a copied folder) fails its fingerprint check."""
    block = _one_block(pair, story, tmp_path)
    target = pair[0]
    mine = kv_store.model_fingerprint(target)
    with torch.no_grad():
        w = target.model.norm.weight
        saved = w.clone()
        w.mul_(1.001)  # a slightly retrained checkpoint
        try:
            other = store_for(pair, tmp_path)
        finally:
            w.copy_(saved)
    assert other.fingerprint["weights"] != mine["weights"] and other.dir != block.parent
    assert other.cached_prefix(story) == 0  # its keys commit to the fingerprint: the block is not even found
    # a block of the first model under the name the other expects (a collision, a hand-copied file)
    other.path(kv_store.block_keys(other.digest, story)[0]).write_bytes(block.read_bytes())
    warnings: list[str] = []
    other.warn = warnings.append
    assert other.restore(_empty_cache(target, len(story)), story, len(story) - 1) == 0
    assert len(warnings) == 1 and "another model" in warnings[0], warnings


def _empty_cache(target, n):
    from offload_runtime.caches.full import FullCache
    return FullCache(target.cfg, "cpu", torch.float32, capacity=n)


def test_writes_are_atomic_and_a_full_disk_is_a_warning(pair, story, reference, tmp_path, monkeypatch):
    real_replace = kv_store.os.replace

    def crash(src, dst):  # the process dies between writing and renaming
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_store.os, "replace", crash)
    warnings: list[str] = []
    tokens, _ = answer(pair, story, store_for(pair, tmp_path, warnings))
    assert tokens == reference  # generation went on
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not list(tmp_path.rglob(f"*{kv_store.SUFFIX}")) and not list(tmp_path.rglob("*.tmp"))  # no half block
    monkeypatch.setattr(kv_store.os, "replace", real_replace)
    answer(pair, story, store_for(pair, tmp_path))
    assert len(list(tmp_path.rglob(f"*{kv_store.SUFFIX}"))) == 1 and not list(tmp_path.rglob(".*.tmp"))


WRITER = """
import sys, torch
from offload_runtime import loading, trained
from offload_runtime.kv_store import KVStore
from offload_runtime.caches.full import FullCache
torch.set_num_threads(1)
m = loading.load(str(trained.TARGET), torch.device("cpu"), "float32")
ids = m.tokenizer(trained.story_prompt())["input_ids"]
cache = FullCache(m.model.cfg, "cpu", torch.float32, capacity=len(ids))
with torch.inference_mode():
    m.model(torch.tensor(ids), cache)
store = KVStore(sys.argv[1], m.model)
for _ in range(20):  # again and again: the other process writes the same block meanwhile
    for p in store.dir.glob("*.kvb"):
        p.unlink(missing_ok=True)
    store.save(cache, ids)
print("saved")
"""


def test_two_processes_writing_the_same_store(pair, story, reference, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 and "saved" in out for p, (out, _) in zip(procs, outs)), outs
    warnings: list[str] = []
    tokens, stats = answer(pair, story, store_for(pair, tmp_path, warnings))
    assert tokens == reference and stats["restored_tokens"] == BLOCK and not warnings


def test_least_recently_used_blocks_go_first_and_the_store_lists_and_clears(pair, story, tmp_path, capsys):
    store = store_for(pair, tmp_path)
    answer(pair, story, store)
    (first,) = store.dir.glob(f"*{kv_store.SUFFIX}")
    size = first.stat().st_size
    other = [t + 1 for t in story]
    answer(pair, other, store)  # a second document: a second block
    import os
    os.utime(first, (1, 1))  # the first document was used long ago
    assert kv_store.evict(tmp_path, size + 10) == 1
    assert not first.exists() and store.cached_prefix(other) == BLOCK
    assert kv_store.main([str(tmp_path)]) == 0
    assert "1 block (256 tokens)" in capsys.readouterr().out
    assert kv_store.main([str(tmp_path), "--clear"]) == 0 and store.cached_prefix(other) == 0
    assert capsys.readouterr().out == "deleted 1 block\n"
    assert kv_store.main([str(tmp_path)]) == 0  # the model's folder is gone, and the store says it is empty
    assert capsys.readouterr().out == f"{tmp_path}: empty (no blocks)\n"
    assert kv_store.main([str(tmp_path / "missing")]) == 2


def test_the_store_command_on_a_folder_without_blocks_says_so(tmp_path, capsys):
    (tmp_path / "v1" / "abc").mkdir(parents=True)  # a model's folder whose blocks were all evicted
    for folder in (tmp_path, tmp_path / "v1"):
        assert kv_store.main([str(folder)]) == 0
        assert capsys.readouterr().out == f"{folder}: empty (no blocks)\n"
    assert kv_store.main([str(tmp_path), "--max-gb", "1"]) == 0
    assert capsys.readouterr().out == f"deleted 0 blocks\n{tmp_path}: empty (no blocks)\n"


def test_cli_second_run_restores_the_document(tmp_path, capsys, story, reference):
    """`--kv-store DIR`: a restart reads the story's block instead of prefilling it; same tokens."""
    from offload_runtime.run import main

    store = tmp_path / "store"
    argv = ["--model", str(trained.TARGET), "--prompt-file", str(trained.STORY), "--mode", "autoregressive",
            "--max-new-tokens", str(N_NEW), "--json", "--device", "cpu", "--kv-store", str(store)]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["token_ids"] == runs[1]["token_ids"] == reference
    assert [r["stats"]["restored_tokens"] for r in runs] == [0, BLOCK]
    # without --json the summary line on stderr says what was restored, and nothing of it when nothing was
    plain = [a for a in argv if a != "--json"]
    for store_dir, said in [(store, f"restored {BLOCK} tok, prefill {len(story) - BLOCK} tok in "),
                            (tmp_path / "cold", f"tokens, prefill {len(story)} tok in ")]:
        assert main(plain[:-1] + [str(store_dir)]) == 0
        summary = capsys.readouterr().err.strip().splitlines()[-1]
        assert said in summary and summary.count("restored") == (store_dir == store), summary
    assert main(argv[:-2] + ["--kv-store", str(trained.STORY)]) == 2  # a file, not a folder
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--kv-store", str(store)]) == 2  # the demo takes no store


@pytest.mark.parametrize("argv, message", [
    (["--kv-store-max-gb", "0"], "--kv-store-max-gb must be a positive number, got 0.0"),
    (["--kv-store-max-gb", "nan"], "--kv-store-max-gb must be a positive number, got nan"),
    (["--kv-store-max-gb", "-inf"], "expected one argument"),  # argparse reads -inf as a flag
    (["--kv-store-max-gb", "lots"], "invalid float value: 'lots'")])
def test_bad_store_flags_are_one_line(tmp_path, capsys, argv, message):
    from offload_runtime.run import main

    assert main(["--model", str(trained.TARGET), "--prompt", "Once", "--kv-store", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("argv, message", [(["--max-gb", "-1"], "--max-gb must be a number of GB >= 0"),
                                           (["--max-gb", "inf"], "--max-gb must be a number of GB >= 0"),
                                           (["--max-gb", "x"], "invalid float value"), (["--frobnicate"], "unrecognized"),
                                           (["--clear", "--max-gb", "3"], "not allowed with argument --clear")])
def test_the_store_command_answers_mistakes_in_one_line(tmp_path, capsys, argv, message):
    assert kv_store.main([str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_a_jobs_sessions_share_one_opened_store(monkeypatch):
    """The server's contexts share the job's store: opening one fingerprints every weight, once."""
    from offload_runtime import launch

    opened = []
    monkeypatch.setattr(launch, "open_kv_store", lambda config, model: opened.append(model) or object())
    job = launch.Job(torch.device("cpu"), None, None, False)
    assert job.kv_store(None, "model") is job.kv_store(None, "model") and opened == ["model"]
