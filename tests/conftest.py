"""Shared fixtures: the real default model (converted once into the repo's .cache), the shared text corpora, and
tiny random-init models of every supported family."""
from __future__ import annotations

import os
from pathlib import Path

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before triton is first imported.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import platform  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# pyproject.toml installs triton exactly there (`platform_system == 'Linux' and platform_machine == 'x86_64'`)
TRITON_REQUIRED = platform.system() == "Linux" and platform.machine() == "x86_64"


SLOW_TIMEOUT = 1800  # seconds: the default per-test timeout of tests marked slow (the real model on a CPU)


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run the real default model; they get SLOW_TIMEOUT unless they set their own
    @pytest.mark.timeout (every other test has pyproject.toml's `timeout`)."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def import_triton():
    """triton, for the tests of the Triton kernels. Where pyproject.toml makes it a dependency a missing triton is an
    error (so CI cannot go green by skipping every kernel test); elsewhere those tests are skipped."""
    try:
        import triton
    except ImportError as e:
        if TRITON_REQUIRED:
            raise ImportError(f"triton is a dependency on Linux x86-64 (pyproject.toml) but cannot be imported ({e}); "
                              "reinstall with `make install`") from e
        pytest.skip(f"triton is not installed on {platform.system()} {platform.machine()}", allow_module_level=True)
    return triton
ASSETS = Path(os.environ.get("QAT_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    if not ASSETS.is_dir():
        pytest.fail(f"shared assets not found at {ASSETS} (set QAT_ASSETS)")
    return ASSETS


@pytest.fixture(scope="session")
def wikitext_test(assets_dir) -> Path:
    return assets_dir / "corpora" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def wikitext_valid(assets_dir) -> Path:
    return assets_dir / "corpora" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (`make test` converts it; converted here if missing)."""
    from qat.models.convert_gguf import ensure_default_model

    return ensure_default_model(Path(os.environ.get("QAT_SMOLLM2_DIR", REPO / ".cache" / "smollm2-135m")))


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from qat.models.loading import load_fp_model, load_tokenizer

    return load_fp_model(smollm2_dir), load_tokenizer(smollm2_dir)


def tiny_model(family: str, seed: int = 0):
    """A random-init causal LM of the given family with a few blocks and widths divisible by 32."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return LlamaForCausalLM(cfg).eval()
    if family == "qwen2":
        cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return Qwen2ForCausalLM(cfg).eval()
    if family == "opt":
        cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=64)
        return OPTForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        return GPT2LMHeadModel(cfg).eval()
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128)
        return GPTNeoXForCausalLM(cfg).eval()
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "opt", "gpt2", "gpt_neox"]


# ---- tiny model directory: random llama + a byte-level tokenizer (vocab 256 = the tiny model's) ----------------------

def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, wikitext_valid):
    """A tiny random llama with a byte-level tokenizer (vocab 256) and excerpts of WikiText-2 valid as train / val
    text: what the distillation tests run on."""
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama")
    model.save_pretrained(d / "model")
    _byte_tokenizer().save_pretrained(d / "model")
    text = wikitext_valid.read_text(encoding="utf-8")
    (d / "train.txt").write_text(text[:20000], encoding="utf-8")
    (d / "val.txt").write_text(text[20000:30000], encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids OpenMP barrier stalls on a shared, oversubscribed CPU (10x faster there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def token_cache(tmp_path, monkeypatch):
    """Each test its own tokenization cache (QAT_CACHE_DIR), so no test reads another's."""
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "token-cache"))
