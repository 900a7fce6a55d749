"""The tiktoken tokenizer (tokenization_kimi.py) on files in the released layout: a tiktoken.model trained here by a
small byte-level BPE, tokenizer_config.json with the 256 reserved special tokens right after the base vocabulary, and
chat_template.jinja. References: tiktoken used directly with the same ranks and pattern, and a plain-Python BPE
(regex split + lowest-rank-first merges) that shares no code with either."""

import base64
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
import torch

from conftest import ROOT, SHARED, tiny_config_dict

# Kimi's pre-tokenization pattern, written out again here (not imported) so that a wrong pattern in the class fails.
PATTERN = (
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
# The released special tokens, by offset from the end of the base vocabulary (163584 in the released file).
SPECIALS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    254: "[UNK]",
    255: "[PAD]",
}
CHAT_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>"
    "{%- else -%}<|im_system|>{%- endif -%}"
    "{{ message.get('name') or message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)
CORPUS = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
Of Man's first disobedience, and the fruit
Of that forbidden tree whose mortal taste
Brought death into the World, and all our woe,
With loss of Eden, till one greater Man
Restore us, and regain the blissful Seat,
They're here; we've seen it; I'm sure you'll see; he'd know. 1234567 + 89 = 1234656.
Ça va? Größe, naïve café. Привет, мир! 床前明月光，疑是地上霜。 東京 こんにちは 🙂👍
\tdef f(x):\n\t\treturn x  # code\r\n
"""
TEXTS = [
    "To be, or not to be, that is the question:",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n and   \n  mixed  \t whitespace\n",
    "They're HERE; we'VE seen it; I'M sure you'LL see. DON'T",
    "Numbers 1234567890 and 3.14159 and -42",
    "Ça va? Größe, naïve café. Привет, мир!",
    "床前明月光，疑是地上霜。東京タワー こんにちは 한국어",
    "emoji 🙂👍🏽 and 🇫🇷 flags, zero\u200bwidth, combining e\u0301",
    "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>",
    "[BOS]text with [PAD] inside<|im_end|>and after",
    "unfinished <|im_end| and <|reserved_token_5|> are plain text",
    "",
    " ",
    "\n",
]


# ---------------------------------------------------------------------------------------------------------------
# The released layout, built here
# ---------------------------------------------------------------------------------------------------------------
def train_ranks(text, merges):
    """Byte-level BPE: the 256 single bytes, then `merges` times the most frequent adjacent pair within a piece."""
    words = Counter(tuple(bytes([b]) for b in p.encode()) for p in regex.findall("(?V1)" + PATTERN, text))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return ranks


def write_ranks(path, ranks):
    """The tiktoken BPE file format: `base64(token) rank` per line, by rank."""
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines))


def tokenizer_config(n, eos="<|im_end|>"):
    """tokenizer_config.json as released: ids are absolute (n + offset), the class found through auto_map."""
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    return {
        "added_tokens_decoder": {str(n + off): {"content": name, **entry} for off, name in SPECIALS.items()},
        "additional_special_tokens": [
            "<|im_end|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "[EOT]",
            "<|im_system|>",
            "<|im_middle|>",
        ],
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "extra_special_tokens": {},
        "model_max_length": 1048576,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def make_released_tokenizer(folder, ranks, eos="<|im_end|>"):
    folder.mkdir(parents=True, exist_ok=True)
    write_ranks(folder / "tiktoken.model", ranks)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(len(ranks), eos), indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    shutil.copyfile(ROOT / "tokenization_kimi.py", folder / "tokenization_kimi.py")
    return folder


def load(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def ranks():
    return train_ranks(CORPUS, 400)


@pytest.fixture(scope="module")
def folder(ranks, tmp_path_factory):
    return make_released_tokenizer(tmp_path_factory.mktemp("tok") / "kimi-tok", ranks)


@pytest.fixture(scope="module")
def tok(folder):
    return load(folder)


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------
def specials_of(ranks):
    return {name: len(ranks) + off for off, name in SPECIALS.items()}


def tiktoken_reference(ranks):
    return tiktoken.Encoding(name="ref", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials_of(ranks))


def python_reference(text, ranks):
    """Split on the special tokens, then on the pattern; merge each piece's bytes lowest rank first, leftmost first."""
    specials = specials_of(ranks)
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(specials[part])
            continue
        for piece in regex.findall("(?V1)" + PATTERN, part):
            parts = [bytes([b]) for b in piece.encode()]
            while True:
                pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
                best = min(((r, i) for r, i in pairs if r is not None), default=None)
                if best is None:
                    break
                i = best[1]
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            ids += [ranks[p] for p in parts]
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
def test_the_file_is_in_tiktokens_own_format(folder, ranks, monkeypatch):
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, no cache
    assert load_tiktoken_bpe(str(folder / "tiktoken.model")) == ranks
    assert len(ranks) > 600  # the 256 bytes plus merges


def test_loads_through_remote_code_with_the_released_ids(tok, ranks):
    n = len(ranks)
    assert type(tok).__name__ == "TikTokenTokenizer"
    assert type(tok).__module__.startswith("transformers_modules"), type(tok).__module__
    assert len(tok) == tok.vocab_size == n + 256
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (n, n + 2, n + 255, n + 254)
    for off, name in SPECIALS.items():
        assert tok.convert_tokens_to_ids(name) == n + off, name
        assert tok.decode([n + off]) == name
    assert tok.decode([n + 5]) == f"<|reserved_token_{n + 5}|>"  # an unnamed reserved slot
    assert tok.convert_ids_to_tokens([n + 17, n + 100]) == ["<|im_middle|>", f"<|reserved_token_{n + 100}|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_both_references_and_decodes_back(tok, ranks, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    named = set(specials_of(ranks))
    assert ids == tiktoken_reference(ranks).encode(text, allowed_special=named)
    assert ids == python_reference(text, ranks)
    assert tok.encode(text) == ids  # no BOS/EOS added
    assert tok.decode(ids) == text
    # token strings -> text, the other way back
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)) == text


def test_special_tokens_as_plain_text_and_skipped_on_decode(tok, ranks):
    text = "<|im_user|>user<|im_middle|>Hi<|im_end|>"
    plain = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert plain == tiktoken_reference(ranks).encode_ordinary(text)
    assert max(plain) < len(ranks) and tok.decode(plain) == text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "userHi"


def test_long_runs_are_cut_and_round_trip(tok, ranks):
    text = "a" + " " * 100_000 + "x\n" + "b" * 60_000
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # cut every 25,000 characters of a run (tiktoken's regex overflows its stack on runs of about a million)
    pieces = (
        ["a" + " " * 25_000] + [" " * 25_000] * 2 + [" " * 25_000 + "x\n" + "b" * 25_000, "b" * 25_000, "b" * 10_000]
    )
    assert "".join(pieces) == text
    ref = tiktoken_reference(ranks)
    assert ids == [i for p in pieces for i in ref.encode_ordinary(p)]


def test_chat_template_renders_the_released_markers(tok, ranks):
    n = len(ranks)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>Hello!<|im_end|>"
        "<|im_user|>user<|im_middle|>Bye<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == python_reference(text, ranks)
    prompt = [n + 4, *python_reference("assistant", ranks), n + 17]  # <|im_assistant|>assistant<|im_middle|>
    assert ids[-len(prompt) :] == prompt
    assert ids.count(n + 2) == 4  # one <|im_end|> per turn

    tools = [{"type": "function", "function": {"parameters": {"type": "object"}, "name": "f", "description": "d"}}]
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}], tools=tools, tokenize=False, add_generation_prompt=False
    )
    declared = '[{"function":{"description":"d","name":"f","parameters":{"type":"object"}},"type":"function"}]'
    system = "<|im_system|>system<|im_middle|>S<|im_end|>"
    assert text == f"<|im_system|>tool_declare<|im_middle|>{declared}<|im_end|>{system}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_with_padding(tok, ranks, side):
    texts = ["Hi", "To be, or not to be", "Привет, мир! 🙂"]
    batch = tok(texts, padding=True, padding_side=side, return_tensors="pt", add_special_tokens=False)
    width = max(len(python_reference(t, ranks)) for t in texts)
    assert batch["input_ids"].shape == (3, width)
    for row, mask, text in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), texts):
        ref = python_reference(text, ranks)
        pad = [len(ranks) + 255] * (width - len(ref))
        assert row == (ref + pad if side == "right" else pad + ref)
        assert sum(mask) == len(ref)
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == texts


def test_save_pretrained_and_reload(tok, folder, tmp_path):
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    assert (out / "tiktoken.model").read_bytes() == (folder / "tiktoken.model").read_bytes()
    assert (out / "tokenization_kimi.py").read_bytes() == (ROOT / "tokenization_kimi.py").read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_kimi.TikTokenTokenizer"
    again = load(out)
    assert again.chat_template == tok.chat_template
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert [again.bos_token_id, again.eos_token_id, again.pad_token_id] == [
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    ]
    assert len(again) == len(tok)


def test_constructed_directly_and_saved_loads_through_auto(ranks, tmp_path):
    from kimi_linear.tokenization_kimi import TikTokenTokenizer

    write_ranks(tmp_path / "tiktoken.model", ranks)
    direct = TikTokenTokenizer(str(tmp_path / "tiktoken.model"))  # no config: the released names and ids
    n = len(ranks)
    assert (direct.bos_token_id, direct.eos_token_id, direct.pad_token_id) == (n, n + 1, n + 255)
    assert direct.convert_tokens_to_ids("<|im_middle|>") == n + 17
    direct.save_pretrained(tmp_path / "out")
    loaded = load(tmp_path / "out")
    assert type(loaded).__module__.startswith("transformers_modules")
    text = "<|im_user|>user<|im_middle|>Hi 世界<|im_end|>"
    assert loaded(text)["input_ids"] == direct(text)["input_ids"] == python_reference(text, ranks)


def test_the_real_vocabulary_size_gives_the_released_ids(tmp_path):
    """A tiktoken.model of 163,584 tokens (the released size; tokens here are arbitrary byte strings) with the
    released tokenizer_config.json: the special ids are the ones config.json names."""
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens += [bytes([a, b, c]) for a in range(256) for b in range(256) for c in range(2)][: 163584 - len(tokens)]
    folder = make_released_tokenizer(tmp_path / "real", {t: i for i, t in enumerate(tokens)})
    tok = load(folder)
    released = json.loads((SHARED / "reference" / "official_config_48b_a3b.json").read_text())
    ids = {k: released[f"{k}_token_id"] for k in ("bos", "eos", "pad")}
    assert ids == {"bos": 163584, "eos": 163586, "pad": 163839} and released["vocab_size"] == 163840
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])
    assert len(tok) == released["vocab_size"]
    assert tok.convert_tokens_to_ids(["<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]) == [
        163587,
        163588,
        163594,
        163601,
    ]
    text = "<|im_user|>user<|im_middle|>Hi<|im_end|>"
    ids = tok(text)["input_ids"]
    assert ids[0] == 163587 and ids[-1] == 163586 and tok.decode(ids) == text


def refused(load_it, match):
    """The ValueError raised while loading, found in the exception chain: transformers 5.0 evaluates
    `except import_protobuf_decode_error()` while handling any error of the tokenizer's constructor, which raises an
    ImportError when protobuf is not installed; our ValueError is then its context (printed above it)."""
    with pytest.raises((ValueError, ImportError)) as info:
        load_it()
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ValueError) and re.search(match, str(e)) for e in chain), chain


def test_bad_files_are_refused_by_name(ranks, tmp_path):
    from kimi_linear.tokenization_kimi import TikTokenTokenizer

    bad = tmp_path / "bad"
    make_released_tokenizer(bad, ranks)
    lines = (bad / "tiktoken.model").read_text().splitlines()
    (bad / "tiktoken.model").write_text("\n".join(lines[:10] + ["not base64!"] + lines[10:]) + "\n")
    refused(lambda: load(bad), "line 11: expected '<base64 token> <rank>'")
    (bad / "tiktoken.model").write_text("\n".join(lines[:10] + lines[11:]) + "\n")  # a gap in the ranks
    refused(lambda: load(bad), "ranks must be 0")

    wrong = tmp_path / "wrong"  # the released config (ids from 163584) beside a small tiktoken.model
    make_released_tokenizer(wrong, ranks)
    (wrong / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(163584)))
    refused(lambda: load(wrong), "does not belong to this tiktoken.model")
    write_ranks(tmp_path / "tiktoken.model", ranks)
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>'"):
        TikTokenTokenizer(str(tmp_path / "tiktoken.model"), eos_token="<|nope|>")


@torch.no_grad()
def test_text_generation_pipeline_with_the_model(tok, folder, ranks, tmp_path):
    from transformers import pipeline

    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    n = len(ranks)
    config = KimiLinearConfig(
        **tiny_config_dict(vocab_size=n + 256, bos_token_id=n, eos_token_id=n + 2, pad_token_id=n + 255)
    )
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(config).eval()
    path = tmp_path / "model"
    model.save_pretrained(path)
    config_before = (path / "config.json").read_bytes()
    tok.save_pretrained(path)
    assert (path / "config.json").read_bytes() == config_before  # the tokenizer leaves the model's files alone
    assert all((path / f).exists() for f in ("modeling_kimi_linear.py", "configuration_kimi_linear.py"))

    pipe = pipeline("text-generation", model=str(path), trust_remote_code=True)
    assert type(pipe.tokenizer).__name__ == "TikTokenTokenizer"
    prompt = "To be, or not"
    out = pipe(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0]["generated_text"]
    ids = torch.tensor([python_reference(prompt, ranks)])
    expected = tok.decode(model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0])
    assert out == expected and out.startswith(prompt)

    chat = pipe([{"role": "user", "content": "Hi"}], max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert chat[-1]["role"] == "assistant"


def test_from_released_puts_this_tokenizer_in_place_of_the_released_one(ranks, tmp_path):
    from test_from_released import make_released

    from kimi_linear_conversion.from_released import from_released

    src = make_released(tmp_path / "Kimi-Linear-tiny")
    (src / "tokenizer.json").unlink()
    make_released_tokenizer(src, ranks)
    # what the released file starts with: an import that transformers 5.x no longer has
    (src / "tokenization_kimi.py").write_text(
        "from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode\n"
    )
    out = from_released(src, tmp_path / "ours", progress=False)
    assert (out / "tokenization_kimi.py").read_bytes() == (ROOT / "tokenization_kimi.py").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    tok = load(out)
    text = "<|im_user|>user<|im_middle|>Hi 世界<|im_end|>"
    assert tok(text)["input_ids"] == python_reference(text, ranks)
