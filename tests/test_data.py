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


# ---- DataModule ----

def _dm(**kw):
    from qat.data.module import TextDataModule

    return TextDataModule(**kw)


@pytest.fixture()
def seq_file(tmp_path):
    """50 windows of 8 tokens whose first token is the window number: batches are easy to identify."""
    seqs = [torch.cat([torch.tensor([i]), torch.full((7,), 1000 + i)]) for i in range(50)]
    return save_sequences(seqs, tmp_path / "teacher.pt")


def test_datamodule_text_windows_and_calibration(tokenizer, assets_dir):
    story = assets_dir / "corpora" / "tinystories" / "tinystories_sample.txt"
    dm = _dm(tokenizer=tokenizer, train_files=story, seq_len=64, batch_size=4, seed=3, max_train_tokens=600)
    dm.setup("fit")
    ids = tokenize(read_text(story), tokenizer)[:600]
    assert torch.equal(dm.train_ids, ids)
    assert torch.equal(dm.train_windows, pack_windows(ids, 64))
    assert dm.val_dataloader() == []
    cal = dm.calibration(5, seq_len=32)
    assert torch.equal(cal, sample_windows(ids, 5, 32, seed=3))
    assert torch.equal(cal, _dm(tokenizer=tokenizer, train_files=[story], seq_len=64, seed=3,
                                max_train_tokens=600).calibration(5, seq_len=32))


def test_datamodule_val_fraction_split_is_seeded_and_disjoint(seq_file):
    dm = _dm(tokenizer=None, train_files=seq_file, seq_len=8, batch_size=4, seed=1, val_fraction=0.2)
    dm.setup()
    tr, va = dm.train_windows[:, 0].tolist(), dm.val_windows[:, 0].tolist()
    assert len(va) == 10 and len(tr) == 40 and sorted(tr + va) == list(range(50))
    dm2 = _dm(tokenizer=None, train_files=seq_file, seq_len=8, batch_size=4, seed=1, val_fraction=0.2)
    dm2.setup()
    assert dm2.val_windows[:, 0].tolist() == va
    dm3 = _dm(tokenizer=None, train_files=seq_file, seq_len=8, batch_size=4, seed=2, val_fraction=0.2)
    dm3.setup()
    assert dm3.val_windows[:, 0].tolist() != va
    assert [b[:, 0].tolist() for b in dm.val_dataloader()] == [va[i:i + 4] for i in range(0, 10, 4)]


def test_datamodule_val_file_and_bad_arguments(seq_file, tmp_path, tokenizer):
    val = save_sequences([torch.arange(20)], tmp_path / "val.pt")
    dm = _dm(tokenizer=None, train_files=seq_file, val_file=val, seq_len=8, max_val_tokens=17)
    dm.setup()
    assert torch.equal(dm.val_windows, torch.arange(16).view(2, 8))
    with pytest.raises(ValueError, match="either val_file or val_fraction"):
        _dm(tokenizer=None, train_files=seq_file, val_file=val, val_fraction=0.1)
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(ValueError, match="is text and needs a tokenizer"):
        _dm(tokenizer=None, train_files=tmp_path / "t.txt", seq_len=2).setup()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        _dm(tokenizer=tokenizer, train_files=tmp_path / "empty.txt", seq_len=2).setup()


def test_train_order_seeded_per_epoch(seq_file):
    def epoch_orders(seed):
        loader = _dm(tokenizer=None, train_files=seq_file, seq_len=8, batch_size=8, seed=seed).train_dataloader()
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            out.append(torch.cat([b[:, 0] for b in loader]).tolist())
        return out

    e0, e1 = epoch_orders(5)
    assert e0 == torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()
    assert e1 == torch.randperm(50, generator=torch.Generator().manual_seed(6)).tolist()
    assert epoch_orders(5) == [e0, e1]
    assert sorted(e0) == list(range(50)) and e0 != e1


def test_state_round_trip_gives_same_next_batches(seq_file):
    kw = dict(tokenizer=None, train_files=seq_file, seq_len=8, batch_size=4, seed=11)
    dm = _dm(**kw)
    loader = dm.train_dataloader()
    loader.set_epoch(2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == 3
    rest = [b.clone() for b in it]

    dm2 = _dm(**kw)
    dm2.load_state_dict(state)
    loader2 = dm2.train_dataloader()
    assert len(loader2) == len(loader) == 13  # Lightning counts the epoch's full length
    resumed = list(loader2)
    assert len(resumed) == len(rest) == 10
    assert all(torch.equal(a, b) for a, b in zip(resumed, rest))
    # the next epoch is a full, freshly shuffled one
    loader2.set_epoch(3)
    assert torch.cat([b[:, 0] for b in loader2]).tolist() == \
        torch.randperm(50, generator=torch.Generator().manual_seed(14)).tolist()
    with pytest.raises(ValueError, match="checkpoint has batch_size=4, the data now has batch_size=5"):
        _dm(**{**kw, "batch_size": 5}).train_dataloader().load_state_dict(state)


def test_lightning_mid_epoch_resume_sees_the_same_batches(seq_file, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[:, 0].tolist())
            return (self.w * batch.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(max_steps, **kw):
        return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)

    kw = dict(tokenizer=None, train_files=seq_file, seq_len=8, batch_size=8, seed=4)  # 6 full batches + 1 of 2
    straight = Recorder()
    trainer(17, enable_checkpointing=False).fit(straight, datamodule=_dm(**kw))
    assert len(straight.seen) == 17

    first = Recorder()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10, save_top_k=-1)
    trainer(10, callbacks=[ckpt]).fit(first, datamodule=_dm(**kw))
    path = tmp_path / "ck" / "epoch=1-step=10.ckpt"
    assert path.is_file()
    saved = torch.load(path, weights_only=False)
    assert saved["TextDataModule"] == {"seed": 4, "epoch": 1, "batches_consumed": 3, "batch_size": 8,
                                       "num_samples": 50}
    second = Recorder()
    trainer(17, enable_checkpointing=False).fit(second, datamodule=_dm(**kw), ckpt_path=str(path))
    assert first.seen + second.seen == straight.seen
