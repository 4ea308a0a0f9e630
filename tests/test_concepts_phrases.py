"""Concept vocabularies and banks (prompt ensembling, top-k), and the phrase generators and cache."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import isearle.concepts
import isearle.paths
from isearle.backbone import WeightsUnavailable
from isearle.concepts import TEMPLATES, ConceptBank, concept_bank, load_vocabulary
from isearle.oti import replace_concept
from isearle.phrases import generate_phrases, keep_valid, lm_generator, offline_generator

NAMES = ["dog", "cat", "red car", "Jack-o'-lantern", "tree", "Band-Aid"]


# ------------------------------------------------------------------------------- vocabularies
def test_imagenet_vocabulary_has_1000_distinct_names():
    names = load_vocabulary("imagenet")
    assert len(names) == 1000
    assert len(set(names)) == 1000
    assert names[0] == "tench" and names[-1] == "toilet paper"


def test_text_file_vocabulary(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("dog\n  cat  \n\nred car\ndog\n", encoding="utf-8")
    assert load_vocabulary(str(path)) == ["dog", "cat", "red car"]
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        load_vocabulary(str(tmp_path / "missing.txt"))


def test_openimages_offline_without_cache_raises():
    assert not isearle.paths.CACHE_DIR.exists()  # the autouse fixture's empty cache
    with pytest.raises(WeightsUnavailable, match="imagenet"):
        load_vocabulary("openimages")


def test_openimages_from_cache():
    cache = isearle.paths.CACHE_DIR
    cache.mkdir(parents=True)
    (cache / "oidv7-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n/m/011k07,Tortoise\n/m/0120dh,Sea turtle\n/m/01226z,Football\n/m/x,Tortoise\n",
        encoding="utf-8")
    assert load_vocabulary("openimages") == ["Tortoise", "Sea turtle", "Football"]


# ------------------------------------------------------------------------------- concept bank
def test_concept_bank_prompt_ensembling(tiny):
    assert len(TEMPLATES) == 24
    bank = ConceptBank.build(tiny, NAMES, progress=False)
    assert bank.names == NAMES
    assert bank.features.shape == (len(NAMES), tiny.embed_dim)
    assert torch.allclose(bank.features.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-5)
    # the ensemble by hand for one concept: normalise each template's feature, average, renormalise
    with torch.no_grad():
        each = F.normalize(tiny.encode_texts([t.format("red car") for t in TEMPLATES]), dim=-1)
    manual = F.normalize(each.mean(dim=0), dim=-1)
    assert float((bank.features[2] - manual).abs().max()) <= 1e-5
    # chunking does not change the result
    small = ConceptBank.build(tiny, NAMES, batch_size=4, progress=False)
    assert float((small.features - bank.features).abs().max()) <= 1e-5


def test_concept_bank_topk_ranks_the_matching_concept_first(tiny):
    bank = ConceptBank.build(tiny, NAMES, progress=False)
    image = 7.0 * bank.features  # un-normalised image features equal to each concept's feature
    scores, idx = bank.topk(image, k=3)
    assert scores.shape == idx.shape == (len(NAMES), 3)
    assert idx[:, 0].tolist() == list(range(len(NAMES)))
    assert torch.allclose(scores[:, 0], torch.ones(len(NAMES)), atol=1e-5)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert [row[0] for row in bank.top_names(image, 2)] == NAMES
    assert bank.topk(image, k=100)[1].shape == (len(NAMES), len(NAMES))  # k capped at the vocabulary


def test_concept_bank_save_load_round_trip(tiny, tmp_path):
    bank = ConceptBank.build(tiny, NAMES, progress=False)
    bank.save(tmp_path / "bank.safetensors")
    loaded = ConceptBank.load(tmp_path / "bank.safetensors")
    assert loaded.names == NAMES
    assert torch.equal(loaded.features, bank.features)
    with pytest.raises(ValueError):
        ConceptBank(NAMES[:2], bank.features)


def test_concept_bank_is_cached_on_disk(tiny_file, tmp_path, monkeypatch):
    tiny = tiny_file
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(NAMES), encoding="utf-8")
    first = concept_bank(tiny, str(vocab), cache_dir=tmp_path / "banks", progress=False)
    assert len(list((tmp_path / "banks").glob("*.safetensors"))) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("the cached bank must be loaded, not rebuilt")

    monkeypatch.setattr(ConceptBank, "build", no_build)
    second = concept_bank(tiny, str(vocab), cache_dir=tmp_path / "banks", progress=False)
    assert second.names == first.names and torch.equal(second.features, first.features)


# ------------------------------------------------------------------------------------ phrases
def test_keep_valid_drops_phrases_that_lose_the_concept():
    phrases = ["a photo of dog that runs", "a photo of a hotdog", "a photo of  dog that runs",
               "a photo of Dog on grass", "a photo of dogs", "a cat"]
    assert keep_valid("dog", phrases) == ["a photo of dog that runs"]  # case-sensitive (SEARLE)


def test_generate_phrases_drops_and_resumes(tmp_path):
    calls: list[str] = []

    def generator(concept: str) -> list[str]:
        calls.append(concept)
        if concept == "cat":
            return ["a photo of cat that sleeps", "a photo of a kitten"]  # the second lost "cat"
        return [f"a photo of {concept} that is small", f"a photo of {concept} that is  small",
                f"a photo of {concept} on a table"]

    cache = tmp_path / "phrases" / "bank.json"
    bank = generate_phrases(["dog", "cat"], generator, cache=cache, progress=False)
    assert calls == ["dog", "cat"]
    assert bank["dog"] == ["a photo of dog that is small", "a photo of dog on a table"]
    assert bank["cat"] == []  # dropped: one of its phrases no longer names it
    assert json.loads(cache.read_text()) == bank

    calls.clear()
    again = generate_phrases(["dog", "cat", "tree"], generator, cache=cache, progress=False)
    assert calls == ["tree"]  # dog and cat come from the cache, including the dropped one
    assert again["dog"] == bank["dog"] and again["cat"] == [] and len(again["tree"]) == 2
    assert json.loads(cache.read_text()) == again


@pytest.mark.parametrize("concept", NAMES)
def test_offline_generic_phrases_contain_the_concept(concept):
    phrases = offline_generator(samples=16, seed=0)(concept)
    assert len(phrases) == 16 and len(set(phrases)) == 16
    for phrase in phrases:
        assert phrase.startswith(f"a photo of {concept} that ")
        assert replace_concept(phrase, concept) is not None
    assert keep_valid(concept, phrases) == phrases
    assert offline_generator(samples=16, seed=0)(concept) == phrases  # seeded


def test_lm_generator_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    from isearle.phrases import LMConfig

    with pytest.raises(RuntimeError, match=r"isearle\[lm\]"):
        lm_generator(LMConfig())


# ------------------------------------------------------------------- phrases holding the placeholder
def test_phrases_with_a_dollar_are_dropped_when_made_and_when_loaded(tmp_path, caplog):
    from isearle.phrases import load_phrase_bank

    def generator(concept: str) -> list[str]:
        return [f"a photo of {concept} that costs $5", f"a photo of {concept} that is small", f"a $ {concept}"]

    with caplog.at_level("WARNING", logger="isearle.phrases"):
        bank = generate_phrases(["dog"], generator, progress=False)
    assert bank == {"dog": ["a photo of dog that is small"]}  # kept, not dropped as a concept
    assert 'dropped 2 generated phrase(s) containing "$"' in caplog.text
    path = tmp_path / "bank.json"
    path.write_text(json.dumps({"dog": ["a photo of dog that costs $5", "a photo of dog"], "cat": ["a $ cat"]}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="isearle.phrases"):
        assert load_phrase_bank(path) == {"dog": ["a photo of dog"], "cat": []}
    assert "dropped 2 phrase(s)" in caplog.text
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="isearle phrases"):
        load_phrase_bank(path)


@pytest.mark.parametrize("part", ["weights", "precision", "templates", "vocabulary"])
def test_each_part_of_the_concept_bank_key_misses_the_cache(tiny_file, tmp_path, part):
    """A bank built with other weights, in another precision, with other templates or from another
    vocabulary file's content is never read back."""
    import dataclasses

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(NAMES), encoding="utf-8")
    banks = tmp_path / "banks"
    concept_bank(tiny_file, str(vocab), cache_dir=banks, progress=False)
    concept_bank(tiny_file, str(vocab), cache_dir=banks, progress=False)
    assert len(list(banks.glob("*.safetensors"))) == 1  # the same settings hit
    backbone, templates = tiny_file, TEMPLATES
    if part == "weights":
        other = tmp_path / "retrained.pt"
        other.write_bytes(Path(tiny_file.pretrained).read_bytes() + b"\0")  # same tag, other file content
        backbone = dataclasses.replace(tiny_file, pretrained=str(other))
    elif part == "precision":
        backbone = dataclasses.replace(tiny_file, precision="bf16")
    elif part == "templates":
        templates = TEMPLATES[:3]
    else:
        vocab.write_text("\n".join(NAMES[:-1]), encoding="utf-8")
    concept_bank(backbone, str(vocab), cache_dir=banks, progress=False, templates=templates)
    assert len(list(banks.glob("*.safetensors"))) == 2


# -------------------------------------------------------------------- phrase generation at scale
def test_phrase_generation_resumes_concept_by_concept_after_a_kill(tmp_path, caplog):
    """A multi-hour run killed mid-way keeps every finished concept (a journal line each) and the next
    run generates only the rest; the settings it was started with are kept, other ones refused; the
    log says the throughput."""
    from isearle.artifacts import ArtifactError

    calls: list[str] = []
    killed: list[bool] = []

    def generator(concept: str) -> list[str]:
        if concept == "cat" and not killed:
            killed.append(True)
            raise KeyboardInterrupt
        calls.append(concept)
        return [f"a photo of {concept} that runs\n\nfast..", f"a photo of {concept} that runs\n\nfast.."]

    out = tmp_path / "bank.json"
    with pytest.raises(KeyboardInterrupt):
        generate_phrases(["dog", "cow", "cat", "eel"], generator, cache=out, progress=False, style="searle")
    assert calls == ["dog", "cow"] and not out.exists()
    calls.clear()
    with caplog.at_level("INFO", logger="isearle.phrases"):
        bank = generate_phrases(["dog", "cow", "cat", "eel"], generator, cache=out, progress=False, style="searle")
    assert calls == ["cat", "eel"]  # dog and cow came from the journal
    assert bank["dog"] == ["a photo of dog that runs. fast."] * 2  # SEARLE's preparation, duplicates kept
    assert json.loads(out.read_text()) == bank and not list(tmp_path.glob("*.partial.jsonl"))
    assert "phrases/s" in caplog.text
    with pytest.raises(ArtifactError, match="style differ"):
        generate_phrases(["dog"], generator, cache=out, progress=False, style="isearle")


def test_lm_generator_runs_fp16_on_cuda_in_calls_of_256(monkeypatch):
    """SEARLE's generation: the model in fp16 on CUDA (fp32 on a CPU), all 256 samples of a concept in one
    `generate` call, raw texts returned for the preparation step."""
    import types

    import isearle.phrases as phrases
    from isearle.phrases import LMConfig

    seen: dict = {"generate": []}

    class Model:
        def eval(self):
            return self

        def to(self, device):
            seen["device"] = str(device)
            return self

        def generate(self, **kw):
            seen["generate"].append(kw["num_return_sequences"])
            return torch.zeros(kw["num_return_sequences"], 3, dtype=torch.long)

    class Tokenizer:
        pad_token, eos_token, pad_token_id = None, "<eos>", 0

        def __call__(self, text, return_tensors):
            seen["prompt"] = text
            return types.SimpleNamespace(to=lambda device: {"input_ids": torch.zeros(1, 3, dtype=torch.long)})

        def batch_decode(self, seqs, skip_special_tokens):
            return ["a photo of dog that\nruns"] * len(seqs)

    def model_from_pretrained(name, torch_dtype):
        seen["dtype"] = torch_dtype
        return Model()

    fake = types.SimpleNamespace(AutoModelForCausalLM=types.SimpleNamespace(from_pretrained=model_from_pretrained),
                                 AutoTokenizer=types.SimpleNamespace(from_pretrained=lambda name: Tokenizer()))
    monkeypatch.setitem(sys.modules, "transformers", fake)
    monkeypatch.setattr(phrases, "hub_offline", lambda: False)
    out = phrases.lm_generator(LMConfig(device="cuda"))("dog")
    assert seen["device"] == "cuda" and seen["dtype"] == torch.float16 and seen["generate"] == [256]
    assert seen["prompt"] == "a photo of dog that" and out == ["a photo of dog that\nruns"] * 256  # raw
    seen["generate"].clear()
    phrases.lm_generator(LMConfig(device="cpu", samples=300))("dog")
    assert seen["dtype"] == torch.float32 and seen["generate"] == [256, 44]
