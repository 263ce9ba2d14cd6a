"""Token-embedding surgery shared by Textual Inversion and the adversarial-prompt attacks.

Both attacks learn vectors that the text encoder(s) read in place of token embeddings, while every
weight of the model stays frozen. They do it the same way: a forward hook on each encoder's input
embedding (``get_input_embeddings()``) swaps the learned vectors into its output, so gradients reach
only the vectors, and the pipeline's own ``encode_prompt`` (with SDXL's two encoders and pooled
embedding) keeps working unchanged.

- :class:`PlaceholderToken` (Textual Inversion) adds a new token to the tokenizer(s) and a new row
  to each embedding table; the hook substitutes the trainable vector wherever the token's id
  appears, and :meth:`PlaceholderToken.sync` writes it into the new row, so the model also works
  without the hook (and saves with the learned row).
- :class:`PrefixEmbeddings` (prompt attacks) substitutes vectors at fixed positions right after the
  start token, so no tokenizer changes; :func:`nearest_tokens` projects them back to real tokens.

On SDXL a token exists in both tokenizers (they share CLIP's vocabulary), so each learned token has
one vector per encoder: 768-d for the first, 1280-d for the second on the real model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from conceptguard.diffusion import Conditioning, image_size, is_sdxl
from conceptguard.errors import ConceptGuardError


def text_encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    """The pipeline's (tokenizer, text encoder) pairs, in the order ``encode_prompt`` uses them."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def embedding_table(encoder: torch.nn.Module) -> torch.nn.Embedding:
    return encoder.get_input_embeddings()


def embedding_weight_name(encoder: torch.nn.Module) -> str:
    """The state-dict name of the encoder's token-embedding table (it differs across transformers versions)."""
    weight = embedding_table(encoder).weight
    return next(name for name, param in encoder.named_parameters() if param is weight)


def replace_word(text: str, word: str, replacement: str) -> str:
    """``text`` with every whole-word, case-insensitive occurrence of ``word`` replaced."""
    pattern = re.compile(rf"(?<![\w<]){re.escape(word)}(?![\w>])", re.IGNORECASE)
    return re.sub(r"\s+", " ", pattern.sub(replacement, text)).strip()


def mentions(text: str, word: str) -> bool:
    return replace_word(text, word, "\0") != " ".join(text.split())


def word_embedding(tokenizer, encoder: torch.nn.Module, text: str) -> torch.Tensor:
    """Mean input embedding of the tokens of ``text`` (how Textual Inversion initializes its vector)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ConceptGuardError(f"cannot initialize from {text!r}: it has no tokens")
    return embedding_table(encoder).weight.detach()[ids].float().mean(0)


# --------------------------------------------------------------------------------------------
# Textual Inversion: one new token, one new embedding row per encoder
# --------------------------------------------------------------------------------------------

class PlaceholderToken:
    """A new token ``placeholder`` whose embedding rows are the only trainable weights.

    With ``num_vectors = N > 1`` the placeholder stands for N tokens — ``placeholder``,
    ``placeholder_1`` … ``placeholder_{N-1}`` — as in diffusers' multi-vector Textual Inversion:
    its pipelines expand the placeholder in a prompt to all N tokens (``maybe_convert_prompt``), so
    prompts keep naming it once. ``vectors[i][j]`` is the fp32 master copy of token j's new row in
    encoder i. The rows of every other token are never written and get no gradient: the table
    itself stays frozen.
    """

    def __init__(self, pipe, placeholder: str, initializer: str, num_vectors: int = 1):
        if num_vectors < 1:
            raise ConceptGuardError(f"num_vectors must be positive, got {num_vectors}")
        self.placeholder = placeholder
        self.tokens = [placeholder] + [f"{placeholder}_{j}" for j in range(1, num_vectors)]
        self.token_ids: list[list[int]] = []
        self.vectors: list[list[torch.nn.Parameter]] = []
        self._hooks: list = []
        self._pairs = text_encoders(pipe)
        for tokenizer, encoder in self._pairs:
            taken = [t for t in self.tokens if t in tokenizer.get_vocab()]
            if taken:
                raise ConceptGuardError(
                    f"the token {taken[0]!r} already exists in the tokenizer; choose another --placeholder")
            init = word_embedding(tokenizer, encoder, initializer)
            tokenizer.add_tokens(self.tokens)
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            table = embedding_table(encoder)
            if max(ids) >= table.num_embeddings:
                # Rows beyond the old table are overwritten below, so the resize needs no clever init.
                encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
                table = embedding_table(encoder)
            with torch.no_grad():
                table.weight[ids] = init.to(table.weight.dtype)
            self.token_ids.append(list(ids))
            self.vectors.append([torch.nn.Parameter(init.clone().to(table.weight.device)) for _ in ids])

    def attach(self) -> None:
        """Start substituting the trainable vectors (idempotent)."""
        if self._hooks:
            return
        for (_, encoder), ids, vectors in zip(self._pairs, self.token_ids, self.vectors):
            self._hooks.append(embedding_table(encoder).register_forward_hook(_substitute_ids(ids, vectors)))

    def detach(self) -> None:
        """Stop substituting; the rows written by :meth:`sync` remain."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the trainable vectors into the embedding tables' new rows."""
        for (_, encoder), ids, vectors in zip(self._pairs, self.token_ids, self.vectors):
            table = embedding_table(encoder)
            table.weight[ids] = torch.stack(list(vectors)).to(table.weight.dtype)

    def named_vectors(self) -> dict[str, torch.nn.Parameter]:
        names = ["text_encoder", "text_encoder_2"]
        return {f"{names[i]}.token_embedding[{token}]": vector
                for i, vectors in enumerate(self.vectors) for token, vector in zip(self.tokens, vectors)}

    def learned_embeds(self) -> dict[str, torch.Tensor]:
        """The learned rows in diffusers' ``load_textual_inversion`` format (one file per encoder;
        several vectors are one (N, dim) tensor under the placeholder, which diffusers expands)."""
        rows = [torch.stack([v.detach().cpu().clone() for v in vectors]) for vectors in self.vectors]
        if len(rows) == 1:
            return {self.placeholder: rows[0][0] if len(self.tokens) == 1 else rows[0]}
        return {"clip_l": rows[0], "clip_g": rows[1]}


def _substitute_ids(token_ids: Sequence[int], vectors: Sequence[torch.Tensor]):
    def hook(module, inputs, output):
        (ids,) = inputs
        for token_id, vector in zip(token_ids, vectors):
            where = (ids == token_id).unsqueeze(-1)
            if bool(where.any()):
                output = torch.where(where, vector.to(output.dtype), output)
        return output

    return hook


def candidate_token_ids(tokenizer, encoder: torch.nn.Module) -> torch.Tensor:
    """Ids a hard prompt may use: the base vocabulary, without special or added tokens."""
    size = min(embedding_table(encoder).num_embeddings, tokenizer.vocab_size)
    banned = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(size) if i not in banned], dtype=torch.long)


class PrefixEmbeddings:
    """``num_tokens`` vectors read at positions ``1 .. num_tokens`` (right after the start token).

    The prompts fed to the encoders must carry placeholders there: :func:`prefixed_ids` builds
    them. With ``straight_through`` the encoders read the vectors' nearest real tokens, and the
    gradient flows to the continuous vectors (PEZ-style projected optimization); otherwise they
    read the vectors themselves.
    """

    def __init__(self, pipe, init_ids: torch.Tensor, *, straight_through: bool = True):
        self._pairs = text_encoders(pipe)
        self.num_tokens = int(init_ids.numel())
        self.straight_through = straight_through
        self.tables = [embedding_table(encoder).weight.detach() for _, encoder in self._pairs]
        self.candidates = candidate_token_ids(*self._pairs[0])
        self.vectors = [torch.nn.Parameter(table[init_ids].float().clone()) for table in self.tables]
        self._hooks: list = []

    def project(self) -> torch.Tensor:
        """The nearest real token of each vector (token ids, shape (num_tokens,))."""
        return nearest_tokens([v.detach() for v in self.vectors], self.tables, self.candidates)

    def read_vectors(self) -> list[torch.Tensor]:
        if not self.straight_through:
            return list(self.vectors)
        ids = self.project()
        return [v + (table[ids].float() - v).detach() for v, table in zip(self.vectors, self.tables)]

    def __enter__(self) -> "PrefixEmbeddings":
        vectors = self.read_vectors()
        for (_, encoder), vector in zip(self._pairs, vectors):
            self._hooks.append(embedding_table(encoder).register_forward_hook(_substitute_prefix(vector)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _substitute_prefix(vectors: torch.Tensor):
    def hook(module, inputs, output):
        output = output.clone()
        output[:, 1:1 + vectors.shape[0]] = vectors.to(output.dtype)
        return output

    return hook


def nearest_tokens(vectors: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
                   candidates: torch.Tensor) -> torch.Tensor:
    """Per position, the candidate token whose embeddings are closest to the vectors.

    Closeness is cosine similarity (as in PEZ), summed over the encoders, so on SDXL one token is
    chosen for both encoders — a hard prompt is one string of tokens.
    """
    score = 0
    for vector, table in zip(vectors, tables):
        rows = torch.nn.functional.normalize(table[candidates].float(), dim=-1)
        score = score + torch.nn.functional.normalize(vector.float(), dim=-1) @ rows.T
    return candidates[score.argmax(-1).cpu()]


def prefixed_ids(tokenizer, prompts: Sequence[str], prefix_ids: torch.Tensor) -> torch.Tensor:
    """Token ids of ``prompts`` with ``prefix_ids`` inserted after the start token.

    Padded like the pipeline pads (``max_length``); the prompt is cut, keeping its end token, so
    that the prefix always fits.
    """
    length = tokenizer.model_max_length
    k = int(prefix_ids.numel())
    if k > length - 2:
        raise ConceptGuardError(f"{k} prompt tokens do not fit the tokenizer's {length}-token context")
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=True, max_length=length - k).input_ids
        row = ids[:1] + prefix_ids.tolist() + ids[1:]
        rows.append(row + [tokenizer.pad_token_id] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def encode_ids(pipe, ids_per_encoder: Sequence[torch.Tensor], device=None) -> Conditioning:
    """The conditioning ``encode_prompt`` computes, from token ids instead of text.

    Mirrors diffusers (without ``clip_skip``): SD 1.x/2.x take the encoder's last hidden state
    (no attention mask: SD's CLIP encoders do not set ``use_attention_mask``); SDXL concatenates
    both encoders' penultimate hidden states and pools from the second encoder.
    """
    device = device or pipe.unet.device
    pairs = text_encoders(pipe)
    if not is_sdxl(pipe):
        (_, encoder), ids = pairs[0], ids_per_encoder[0]
        return Conditioning(encoder(ids.to(device), attention_mask=None)[0])
    hidden, pooled = [], None
    for (_, encoder), ids in zip(pairs, ids_per_encoder):
        out = encoder(ids.to(device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    embeds = torch.cat(hidden, dim=-1)
    size = image_size(pipe)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=device)
    return Conditioning(embeds, pooled, time_ids.repeat(embeds.shape[0], 1))


def decode_tokens(tokenizer, ids: Sequence[int]) -> str:
    """Human-readable text of token ids (a hard prompt need not re-tokenize to the same ids)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


__all__ = [
    "PlaceholderToken",
    "PrefixEmbeddings",
    "candidate_token_ids",
    "decode_tokens",
    "embedding_weight_name",
    "encode_ids",
    "mentions",
    "nearest_tokens",
    "prefixed_ids",
    "replace_word",
    "text_encoders",
    "word_embedding",
]
