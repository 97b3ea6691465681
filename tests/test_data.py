"""Data layer: reading text/jsonl, tokenizing with bos once, packing/sampling windows, the DataModule's split,
per-epoch order and resumable position (also through a real Lightning checkpoint)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from qat.data.text import (
    load_sequences,
    pack_windows,
    read_text,
    sample_windows,
    save_sequences,
    tokenize,
    tokenize_file,
)


@pytest.fixture(scope="module")
def tokenizer(assets_dir):
    from qat.models.loading import load_tokenizer

    return load_tokenizer(assets_dir / "smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "qat-cache"))


# ---- reading ----

def test_read_text_crlf_and_exact_whitespace(tmp_path):
    p = tmp_path / "a.raw"
    p.write_bytes(b" = Title = \r\n\r\n  two  spaces\ttab \r\nend\r\n")
    assert read_text(p) == " = Title = \n\n  two  spaces\ttab \nend\n"


def test_read_text_matches_protocol_on_wikitext(wikitext_test):
    raw = wikitext_test.read_bytes()
    assert b"\r\n" in raw
    assert read_text(wikitext_test) == raw.decode("utf-8").replace("\r\n", "\n")


def test_read_jsonl_default_and_custom_field(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"text": "first doc", "body": "x"}, {"text": "second", "body": "y"}]))
    assert read_text(p) == "first doc\n\nsecond"
    assert read_text(p, field="body") == "x\n\ny"
    with pytest.raises(ValueError, match=r"has no field 'content' \(fields: text, body\)"):
        read_text(p, field="content")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file '.*nope\.txt' does not exist"):
        read_text(tmp_path / "nope.txt")
    for name, content in [("e.txt", ""), ("ws.txt", " \r\n\n"), ("e.jsonl", ""), ("blank.jsonl", '{"text": ""}\n')]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=rf"data file '.*{name.replace('.', '[.]')}' is empty"):
            read_text(tmp_path / name)


def test_non_utf8_file_is_a_clear_error(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_text(p)


# ---- tokenizing ----

def test_tokenize_prepends_bos_once(tokenizer):
    assert tokenize("Once upon a time", tokenizer).tolist() == [1, 6403, 1980, 253, 655]
    assert tokenize("Once upon a time", tokenizer, add_bos=False).tolist() == [6403, 1980, 253, 655]


def test_tokenize_long_text_no_max_length_warning(tokenizer, caplog):
    import transformers

    old = tokenizer.model_max_length
    tokenizer.model_max_length = 16
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            ids = tokenize("hello world " * 100, tokenizer)
    finally:
        tokenizer.model_max_length = old
        transformers.logging.disable_propagation()
    assert ids.numel() > 100 and ids[0].item() == 1 and (ids == 1).sum() == 1
    assert "longer than the specified maximum" not in caplog.text


def test_tokenize_file_cache_hits_and_invalidates(tmp_path, tokenizer, monkeypatch):
    from qat.data import text

    p = tmp_path / "t.txt"
    p.write_text("The cat sat on the mat.\n")
    first = tokenize_file(p, tokenizer)
    assert first.tolist() == tokenize("The cat sat on the mat.\n", tokenizer).tolist()
    assert first.dtype == torch.long
    assert len(list((tmp_path / "qat-cache" / "tokens").iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("tokenizer called despite a cache entry")

    monkeypatch.setattr(text, "tokenize", boom)
    assert tokenize_file(p, tokenizer).tolist() == first.tolist()  # served from the cache
    monkeypatch.undo()
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "qat-cache"))
    p.write_text("A dog ran.\n")  # new content -> new key
    assert tokenize_file(p, tokenizer).tolist() == tokenize("A dog ran.\n", tokenizer).tolist()
    assert tokenize_file(p, tokenizer, add_bos=False).tolist() == tokenize("A dog ran.\n", tokenizer, False).tolist()


# ---- windows ----

def test_pack_windows_non_overlapping_drops_tail():
    ids = torch.arange(23)
    w = pack_windows(ids, 5)
    assert w.shape == (4, 5) and w.dtype == torch.long
    assert torch.equal(w.flatten(), torch.arange(20))
    assert torch.equal(pack_windows(ids, 5, max_tokens=12), torch.arange(10).view(2, 5))
    with pytest.raises(ValueError, match="9 tokens are fewer than one window of seq_len 10"):
        pack_windows(torch.arange(9), 10)
    with pytest.raises(ValueError, match="4 tokens are fewer than one window of seq_len 5"):
        pack_windows(ids, 5, max_tokens=4)
    with pytest.raises(ValueError, match="expected a 1-D token stream"):
        pack_windows(ids.view(1, -1), 5)


def test_sample_windows_deterministic_contiguous():
    ids = torch.arange(1000) * 3
    a = sample_windows(ids, 16, 32, seed=7)
    assert a.shape == (16, 32)
    assert torch.equal(a, sample_windows(ids, 16, 32, seed=7))
    assert not torch.equal(a, sample_windows(ids, 16, 32, seed=8))
    starts = a[:, 0] // 3
    assert torch.equal(a, (starts[:, None] + torch.arange(32)) * 3)  # each row is a contiguous slice
    assert starts.min() >= 0 and starts.max() <= 1000 - 32
    assert torch.equal(sample_windows(torch.arange(32), 3, 32, seed=0), torch.arange(32).expand(3, 32))
    with pytest.raises(ValueError, match="31 tokens are fewer than one window of seq_len 32"):
        sample_windows(torch.arange(31), 1, 32, seed=0)


def test_sequences_round_trip_and_errors(tmp_path):
    seqs = [torch.tensor([1, 5, 6]), [1, 7], torch.tensor([1, 8, 9, 10])]
    p = save_sequences(seqs, tmp_path / "gen.pt")
    got = load_sequences(p)
    assert [s.tolist() for s in got] == [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    torch.save(torch.zeros(3, 4), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="sequence 0 is not a 1-D integer sequence"):
        load_sequences(tmp_path / "bad.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="expected a list of token sequences, got dict"):
        load_sequences(tmp_path / "dict.pt")


# ---- the step loader of qat distill (qat/data/module.py) ----

def _plan():
    from qat.data.module import StagePlan, StepPlan

    # a block-wise stage (3 windows x 5 steps over 14 rows, batch 4: lanes of 3, 2 rows unused) and an e2e stage
    return StepPlan([StagePlan(0, 14, 4, 3, 5, 11), StagePlan(1, 20, 4, 1, 7, 12)])


def _batches(plan, rank, world, start=0):
    from qat.data.module import StepLoader

    loader = StepLoader(plan, rank, world)
    loader.batch_sampler.start = start
    return [b.tolist() for b in loader]


def test_step_plan_locates_every_step():
    plan = _plan()
    assert plan.total == 22
    assert [plan.locate(g) for g in (0, 4, 5, 14, 15, 21)] == [(0, 0, 0), (0, 0, 4), (0, 1, 0), (0, 2, 4),
                                                                (1, 0, 0), (1, 0, 6)]


@pytest.mark.parametrize("world", [2, 4])
def test_shards_are_disjoint_cover_the_lanes_and_global_batches_do_not_depend_on_the_world_size(world):
    plan = _plan()
    one = _batches(plan, 0, 1)
    per_rank = [_batches(plan, r, world) for r in range(world)]
    for s in plan.stages:
        lanes = s.lanes()
        shards = [set(s.rows_of(r, world).tolist()) for r in range(world)]
        assert sum(len(x) for x in shards) == len(set().union(*shards)) == lanes.numel()  # disjoint
        assert set().union(*shards) == set(lanes.flatten().tolist())  # covering
        for g in range(plan.starts[s.index], plan.starts[s.index] + s.total):
            assert all(set(per_rank[r][g]) <= shards[r] for r in range(world))  # a rank trains on its shard only
    # step by step, the ranks' rows put together (in rank order) are the one-process batch
    assert [sum((per_rank[r][g] for r in range(world)), []) for g in range(plan.total)] == one


def test_every_epoch_of_a_window_sees_each_lane_row_once_and_batches_mix_anew():
    from qat.data.module import StagePlan, StepPlan

    s = StagePlan(0, 12, 3, 2, 8, 5)  # lanes of 4: steps 0-3 epoch 0, 4-7 epoch 1 of each window
    b = _batches(StepPlan([s]), 0, 1)
    rows = set(s.lanes().flatten().tolist())
    for w in range(2):
        for e in range(2):
            epoch = b[w * 8 + e * 4: w * 8 + e * 4 + 4]
            assert sorted(sum(epoch, [])) == sorted(rows)
    assert {frozenset(x) for x in b[0:4]} != {frozenset(x) for x in b[4:8]}  # new batch compositions
    assert b[0:8] != b[8:16]  # and another order in the next window


def test_loader_state_round_trip_continues_with_the_next_step():
    from qat.data.module import StagePlan, StepLoader, StepPlan

    plan = _plan()
    loader = StepLoader(plan, 1, 2)
    it = iter(loader)
    for _ in range(9):
        next(it)
    state = loader.state_dict()
    assert state["position"] == 9
    rest = [b.tolist() for b in it]
    again = StepLoader(plan, 1, 2)
    again.load_state_dict(state)
    assert len(again) == 22  # Lightning counts the whole run
    assert [b.tolist() for b in again] == rest == _batches(plan, 1, 2)[9:]
    # the position is global: another number of processes resumes at the same step
    four = StepLoader(plan, 0, 4)
    four.load_state_dict(state)
    assert [b.tolist() for b in four] == _batches(plan, 0, 4)[9:]
    other = StepLoader(StepPlan([StagePlan(0, 14, 4, 3, 6, 11), plan.stages[1]]), 0, 1)
    with pytest.raises(ValueError, match="written for another step schedule"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"stage 0 \(bw\): its batch of 4 rows cannot be split evenly over 3"):
        plan.stages[0].check_world(3, "bw")


def test_lightning_mid_run_resume_sees_the_same_batches(tmp_path):
    import lightning as L

    from qat.data.module import StepDataModule

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch.tolist())
            return (self.w * batch.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(max_steps, **kw):
        return L.Trainer(max_steps=max_steps, max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)

    plan = _plan()
    dm = lambda: StepDataModule(plan, lambda dist: torch.zeros(20, 2))  # noqa: E731
    straight = Recorder()
    trainer(-1, enable_checkpointing=False).fit(straight, datamodule=dm())
    assert straight.seen == _batches(plan, 0, 1)

    first = Recorder()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10, save_top_k=-1)
    trainer(10, callbacks=[ckpt]).fit(first, datamodule=dm())
    path = tmp_path / "ck" / "epoch=0-step=10.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 10
    second = Recorder()
    trainer(-1, enable_checkpointing=False).fit(second, datamodule=dm(), ckpt_path=str(path))
    assert first.seen + second.seen == straight.seen
