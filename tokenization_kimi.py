"""Kimi's tiktoken tokenizer for transformers 5.x.

Reads the released `tiktoken.model` and `tokenizer_config.json` unchanged (the class name and file name are the ones
the released `auto_map` points at):

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

- `tiktoken.model`: one `base64(token bytes) rank` per line, ranks 0..N-1 (N = 163,584 in the released file). It is
  parsed here and handed to `tiktoken.Encoding` directly: nothing is fetched or cached.
- 256 reserved special tokens follow the base vocabulary, ids N..N+255. Their names come from the config's
  `added_tokens_decoder` (released: [BOS] 163584, [EOS] 163585, <|im_end|> 163586, <|im_user|> 163587,
  <|im_assistant|> 163588, <|im_system|> 163594, <|im_middle|> 163601, [UNK] 163838, [PAD] 163839, ...); an unnamed
  slot is `<|reserved_token_{id}|>`. So len(tokenizer) == N + 256 == the model's vocab_size.
- Pre-tokenization is Kimi's regex (Han runs apart, case-aware words with English contractions, digits in groups of
  up to 3); the BPE is tiktoken's. Runs of more than 25,000 whitespace or non-whitespace characters are cut first
  (tiktoken's regex engine overflows its backtracking stack on them).
- Special tokens written in the text are encoded as such (`split_special_tokens=True` encodes them as plain text);
  no BOS/EOS is added by `__call__`; the chat template (from the config or chat_template.jinja) renders
  `<|im_user|>user<|im_middle|>...<|im_end|>` turns, and tool schemas with their keys sorted.
"""

import base64
import os
import re
import shutil
from pathlib import Path

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "tiktoken.model"}
NUM_RESERVED_SPECIAL_TOKENS = 256
MAX_RUN = 25_000

PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The released names by offset from the base vocabulary; used when no added_tokens_decoder is given.
RELEASED_SPECIAL_TOKENS = {
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
RELEASED_ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
]


def _byte_chars():
    """GPT-2's printable stand-in character for each byte: token strings (get_vocab, convert_ids_to_tokens) are the
    token's bytes spelled with these characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_TO_CHAR = _byte_chars()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def load_ranks(path):
    """{token bytes: rank} from a tiktoken BPE file; raises ValueError naming the first bad line."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(
                f"{path}, line {number}: expected '<base64 token> <rank>', got {line[:80]!r}. "
                "Is this a tiktoken BPE file (the released tiktoken.model)?"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"{path}: the ranks must be 0..{len(ranks) - 1}, each once (a repeated token or rank, or a gap); "
            "the file is damaged or not a tiktoken BPE file."
        )
    return ranks


def split_long_runs(text, limit=MAX_RUN):
    """`text` in consecutive pieces, none holding more than `limit` whitespace or non-whitespace characters in a row."""
    pieces, start = [], 0
    for run in re.finditer(rf"\s{{{limit + 1},}}|\S{{{limit + 1},}}", text):
        for cut in range(run.start() + limit, run.end(), limit):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


def _sorted_keys(obj):
    if isinstance(obj, dict):
        return {k: _sorted_keys(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [_sorted_keys(v) for v in obj]
    return obj


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    # save_pretrained copies this file and writes auto_map, however the tokenizer was created
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        additional_special_tokens=None,
        added_tokens_decoder=None,
        **kwargs,
    ):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"{vocab_file}: no tiktoken BPE file (tiktoken.model) there.")
        self.vocab_file = str(vocab_file)
        ranks = load_ranks(vocab_file)
        self.num_base_tokens = n = len(ranks)
        reserved = range(n, n + NUM_RESERVED_SPECIAL_TOKENS)

        if added_tokens_decoder is None:
            names = {n + offset: name for offset, name in RELEASED_SPECIAL_TOKENS.items()}
            if additional_special_tokens is None:
                additional_special_tokens = list(RELEASED_ADDITIONAL_SPECIAL_TOKENS)
        else:
            names = {int(i): str(token) for i, token in added_tokens_decoder.items()}
            # every id must be a reserved slot, or come after them where add_tokens puts new tokens
            below = sorted(i for i in names if i < n)
            beyond = sorted(i for i in names if i > reserved[-1])
            if below or beyond != list(range(reserved[-1] + 1, reserved[-1] + 1 + len(beyond))):
                raise ValueError(
                    f"added_tokens_decoder names ids {(below or beyond)[:5]}, but {vocab_file} has {n} base tokens, "
                    f"so the 256 reserved special tokens are ids {n}..{reserved[-1]}. This tokenizer_config.json "
                    "does not belong to this tiktoken.model."
                )
        self.special_tokens = {names.get(i, f"<|reserved_token_{i}|>"): i for i in reserved}
        if len(self.special_tokens) != NUM_RESERVED_SPECIAL_TOKENS:
            raise ValueError("added_tokens_decoder gives two reserved ids the same name.")
        for role, token in (("bos", bos_token), ("eos", eos_token), ("unk", unk_token), ("pad", pad_token)):
            if token is not None and str(token) not in self.special_tokens:
                raise ValueError(
                    f"{role}_token {str(token)!r} is not one of the reserved special tokens (ids {n}..{reserved[-1]}) "
                    "named by added_tokens_decoder; name it there or pass an existing one."
                )

        self.model = tiktoken.Encoding(
            name=Path(vocab_file).name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.encoder = {"".join(BYTE_TO_CHAR[b] for b in token): rank for token, rank in ranks.items()}
        clashes = sorted(set(self.encoder) & set(self.special_tokens))
        if clashes:
            logger.warning(f"base tokens spelled like special tokens: {clashes[:5]}; the special ids win.")
        self.encoder.update(self.special_tokens)
        self.decoder = {i: token for token, i in self.encoder.items()}

        # The named special tokens are the added tokens: written in text they encode to their ids. An unnamed slot
        # decodes to its reserved name but is not looked for in text.
        if added_tokens_decoder is None:
            added_tokens_decoder = {i: AddedToken(name, special=True, normalized=False) for i, name in names.items()}
        if additional_special_tokens is not None:
            kwargs["additional_special_tokens"] = additional_special_tokens
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("special_tokens_pattern", "none")  # __call__ adds no BOS/EOS (5.0 defaults to cls_sep)
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            added_tokens_decoder=added_tokens_decoder,
            **kwargs,
        )

    # -- vocabulary ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self):
        return self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    def get_vocab(self):
        return {**self.encoder, **self._added_tokens_encoder}

    def _convert_token_to_id(self, token):
        return self.encoder.get(token, self.special_tokens.get(str(self.unk_token)))

    def _convert_id_to_token(self, index):
        if index not in self.decoder:
            raise ValueError(f"token id {index} is outside the vocabulary (0..{len(self) - 1}).")
        return self.decoder[index]

    # -- encode / decode ----------------------------------------------------------------------------------------
    def _tokenize(self, text, **kwargs):
        # Special tokens were split off by the base class already: the rest is ordinary text.
        ids = [i for piece in split_long_runs(text) for i in self.model.encode_ordinary(piece)]
        return [self.decoder[i] for i in ids]

    def convert_tokens_to_string(self, tokens):
        data = bytearray()
        for token in tokens:
            index = self.encoder.get(token)
            if index is not None and index < self.num_base_tokens:
                data += bytes(CHAR_TO_BYTE[c] for c in token)
            else:  # a special or user-added token: its text
                data += token.encode("utf-8")
        return data.decode("utf-8", errors="replace")

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        data = bytearray()
        for index in map(int, token_ids):
            if index in skip:
                continue
            if 0 <= index < self.vocab_size:
                data += self.model.decode_single_token_bytes(index)
            elif index in self._added_tokens_decoder:  # added after loading, beyond the reserved slots
                data += self._added_tokens_decoder[index].content.encode("utf-8")
            else:
                raise ValueError(f"token id {index} is outside the vocabulary (0..{len(self) - 1}).")
        return data.decode("utf-8", errors="replace")

    # -- chat, saving -------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, tools=None, **kwargs):
        """As transformers' apply_chat_template; tool schemas are rendered with their keys sorted (as Kimi was
        trained)."""
        return super().apply_chat_template(conversation, tools=_sorted_keys(tools), **kwargs)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory} is not a folder.")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        out = Path(save_directory) / name
        if not out.exists() or not out.samefile(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (str(out),)
