"""Prompt expansion: a short user prompt -> a long caption in the captioner's canonical style.

Sora (and DALL-E 3) expand short prompts into the detailed captions the model was trained on.
Here the training captions are `world.caption(attrs)`, so expansion is: ground the prompt's
words in the world's vocabulary (`world.ATTRIBUTES`), fill the attributes the prompt leaves open
from the training distribution, and write the canonical caption.

Grounding uses the frozen pretrained MiniLM encoder (`components/text_encoder.py`): every span
of one to three words of the prompt is embedded (mean-pooled token states, the sentence
embedding all-MiniLM-L6-v2 was trained for) and compared by cosine with anchor phrases of each
attribute value (`ANCHORS`). A word that is an anchor scores 1.0; any other word grounds to its
nearest anchor when the cosine reaches `expand.min_similarity`. The anchors hold a few common
synonyms besides the value itself: on bare value words pooled MiniLM grounds rare colour words
poorly (measured: "crimson" is nearer "purple" than "red"), see tests/test_expand.py.

An optional backend asks any OpenAI-compatible chat endpoint for the attributes instead
(`expand.backend: openai`); it is never required and never called by the tests.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from components import world
from components.config import ExpandConfig

# attribute -> value -> anchor phrases (the value's own caption wording first).
ANCHORS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "red": ("red", "crimson", "scarlet", "ruby", "cherry red"),
        "green": ("green", "emerald", "lime", "grass green"),
        "blue": ("blue", "navy", "azure", "cobalt", "sky blue"),
        "yellow": ("yellow", "golden", "gold", "lemon yellow"),
        "purple": ("purple", "violet", "lavender", "magenta"),
        "orange": ("orange", "amber", "tangerine"),
        "white": ("white", "ivory", "snow white", "cream"),
    },
    "shape": {
        "circle": ("circle", "ball", "round", "sphere", "disc", "dot"),
        "square": ("square", "box", "cube", "block", "rectangle"),
        "triangle": ("triangle", "triangular", "pyramid", "wedge"),
    },
    "motion": {
        "left": ("moving left", "left", "leftwards", "to the left", "westward"),
        "right": ("moving right", "right", "rightwards", "to the right", "eastward"),
        "up": ("moving up", "up", "upwards", "rising", "ascending", "climbing"),
        "down": ("moving down", "down", "downwards", "falling", "sinking", "descending"),
        "diagonal": ("moving diagonally", "diagonally", "diagonal", "at an angle", "slanting"),
        "still": ("staying still", "still", "not moving", "stationary", "motionless", "static"),
    },
    "speed": {
        "slow": ("slowly", "slow", "unhurried", "leisurely", "gently"),
        "fast": ("quickly", "fast", "rapidly", "swiftly", "speedy", "quick"),
    },
    "size": {
        "small": ("small", "tiny", "little"),
        "large": ("large", "big", "huge", "giant"),
    },
    "background": {
        "black": ("black background", "dark background", "black backdrop"),
        "grey": ("grey background", "gray background", "grey backdrop"),
        "gradient": ("gradient background", "gradient", "fading background"),
        "noise": ("noise background", "noisy background", "textured background"),
    },
}
# Words of the caption world that name no attribute (an object, motion without a direction):
# grounded, but nothing to set. A word nearer to these than to any anchor sets no attribute, so
# "a red ball floating" does not guess a direction from "floating".
FILLER: tuple[str, ...] = ("object", "shape", "thing", "coloured", "colored", "moving", "going",
                           "drifting", "sliding", "gliding", "floating", "travelling", "background",
                           "video", "clip", "scene", "animation")
STOPWORDS = frozenset(
    "a an the of on in at to and with is are its it this that from into onto over across "
    "towards toward along some one".split()
)
MAX_SPAN = 3  # words per span ("to the left", "not moving at")
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def _check_anchors() -> None:
    for attr, values in world.ATTRIBUTES.items():
        if set(ANCHORS[attr]) != set(values):  # one owner of the words: world.py
            raise AssertionError(f"ANCHORS[{attr!r}] does not match world.ATTRIBUTES[{attr!r}]")


_check_anchors()


# ----------------------------------------------------------------------------------------------
# Grounding with MiniLM
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grounding:
    span: str
    attribute: str
    value: str
    similarity: float
    anchor: str


class Grounder:
    """The encoder plus the anchors' embeddings, computed once."""

    def __init__(self, device: str = "cpu"):
        from components.text_encoder import TextEncoder

        self.encoder = TextEncoder(max_tokens=16, device=device)
        self.anchors = [(a, v, p) for a, vals in ANCHORS.items() for v, ps in vals.items() for p in ps]
        self.anchor_vecs = self.embed([p for _, _, p in self.anchors])  # (K, 384)
        self.filler_vecs = self.embed(list(FILLER))  # (F, 384)
        self.attr_index = {a: np.array([i for i, (b, _, _) in enumerate(self.anchors) if b == a])
                           for a in ANCHORS}

    def embed(self, texts: list[str]) -> np.ndarray:
        """-> float32 (N, 384), L2-normalised mean of the token states (padding masked)."""
        tokens, mask = self.encoder.encode(texts)  # (N, L, 384), (N, L)
        m = mask.float().unsqueeze(-1)
        v = ((tokens * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-8)

    def ground(self, prompt: str, min_similarity: float) -> tuple[list[Grounding], list[str]]:
        """Groundings (at most one per attribute, no word used twice) and the ungrounded words."""
        words = _WORD.findall(prompt.lower())
        spans = [(i, n) for n in range(1, MAX_SPAN + 1) for i in range(len(words) - n + 1)
                 if any(w not in STOPWORDS for w in words[i:i + n])]
        if not spans:
            return [], []
        texts = [" ".join(words[i:i + n]) for i, n in spans]
        vecs = self.embed(texts)  # (S, 384)
        sims = vecs @ self.anchor_vecs.T  # (S, K)
        filler = (vecs @ self.filler_vecs.T).max(1)  # (S,)
        candidates = []
        for s, (i, n) in enumerate(spans):
            for attr, idx in self.attr_index.items():
                k = idx[int(sims[s, idx].argmax())]
                # Exact anchors first, then longer spans ("to the left" before "left"), then cosine.
                exact = texts[s] == self.anchors[k][2]
                candidates.append((exact, float(sims[s, k]), n, s, attr, k))
        candidates.sort(key=lambda c: (c[0], round(c[1], 4), c[2]), reverse=True)
        used: set[int] = set()
        found: dict[str, Grounding] = {}
        for exact, sim, n, s, attr, k in candidates:
            i = spans[s][0]
            if attr in found or used & set(range(i, i + n)):
                continue
            if not exact and (sim < min_similarity or sim <= filler[s]):
                continue
            found[attr] = Grounding(texts[s], attr, self.anchors[k][1], round(sim, 4), self.anchors[k][2])
            used |= set(range(i, i + n))
        one_word = {i: s for s, (i, n) in enumerate(spans) if n == 1}
        ungrounded = [w for j, w in enumerate(words)
                      if j not in used and w not in STOPWORDS and filler[one_word[j]] < min_similarity]
        return [found[a] for a in ANCHORS if a in found], ungrounded


@functools.lru_cache(maxsize=2)
def grounder(device: str = "cpu") -> Grounder:
    """One per process: loading MiniLM and embedding the anchors takes a few seconds."""
    return Grounder(device)


# ----------------------------------------------------------------------------------------------
# Filling and expanding
# ----------------------------------------------------------------------------------------------


def distribution_from_captions(captions: list[str]) -> dict[str, dict[str, float]]:
    """Each attribute's value frequencies in training captions (what the model saw most)."""
    counts = {a: {v: 0.0 for v in vals} for a, vals in world.ATTRIBUTES.items()}
    for text in captions:
        for attr, value in world.parse_caption(text).items():
            if value is not None:
                counts[attr][value] += 1
    return counts


def fill(attrs: dict[str, str], seed: int,
         distribution: dict[str, dict[str, float]] | None = None) -> dict[str, str]:
    """Complete `attrs` with draws from `distribution` (default: the world's balanced one)."""
    rng = random.Random(seed)
    out = {}
    for attr, values in world.ATTRIBUTES.items():  # fixed order: same seed, same draws
        weights = [float((distribution or {}).get(attr, {}).get(v, 1.0)) for v in values]
        if sum(weights) <= 0:
            weights = [1.0] * len(values)
        draw = rng.choices(values, weights=weights)[0]
        out[attr] = attrs.get(attr) or draw
    return out


def _result(prompt: str, specified: dict[str, str], seed: int, distribution, backend: str,
            grounding: list[dict], ungrounded: list[str]) -> dict:
    attrs = fill(specified, seed, distribution)
    return {
        "prompt": prompt,
        "caption": world.caption(attrs),
        "attributes": attrs,
        "specified": sorted(specified),
        "filled": sorted(set(attrs) - set(specified)),
        "grounding": grounding,
        "ungrounded": ungrounded,
        "backend": backend,
    }


def expand(prompt: str, seed: int = 0, cfg: ExpandConfig | None = None,
           distribution: dict[str, dict[str, float]] | None = None) -> dict:
    """`{"caption", "attributes", "ungrounded", "specified", "filled", "grounding", ...}`."""
    cfg = cfg or ExpandConfig()
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt {prompt!r} is empty: describe the video, e.g. 'a red ball going left'")
    if cfg.backend == "openai":
        return expand_with_llm(prompt, seed, cfg, distribution)
    if cfg.backend != "minilm":
        raise ValueError(f"expand.backend={cfg.backend!r} is unknown: use minilm or openai")
    found, ungrounded = grounder().ground(prompt, cfg.min_similarity)
    specified = {g.attribute: g.value for g in found}
    grounding = [g.__dict__ for g in found]
    return _result(prompt, specified, seed, distribution, "minilm", grounding, ungrounded)


# ----------------------------------------------------------------------------------------------
# Optional backend: any OpenAI-compatible chat endpoint
# ----------------------------------------------------------------------------------------------

LLM_KEY_ENV = "ZOETROPE_LLM_API_KEY"
LLM_URL_ENV = "ZOETROPE_LLM_URL"


def _llm_messages(prompt: str) -> list[dict]:
    vocab = "; ".join(f"{a}: {', '.join(v)}" for a, v in world.ATTRIBUTES.items())
    system = (
        "You map a short video prompt onto a fixed vocabulary. Answer with one JSON object whose keys "
        f"are {', '.join(world.ATTRIBUTES)}; each value is one word of that attribute's list or null "
        f"when the prompt does not say. Vocabulary: {vocab}. Add a key \"ungrounded\": the prompt's "
        "words you could not map."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def expand_with_llm(prompt: str, seed: int, cfg: ExpandConfig,
                    distribution: dict[str, dict[str, float]] | None = None) -> dict:
    url = cfg.llm_url or os.environ.get(LLM_URL_ENV, "")
    if not url:
        raise ValueError(f"expand.backend=openai needs an endpoint: set expand.llm_url in params.yaml "
                         f"or ${LLM_URL_ENV} (e.g. http://localhost:8000/v1)")
    if not cfg.llm_model:
        raise ValueError("expand.backend=openai needs expand.llm_model (the endpoint's model name)")
    body = json.dumps({"model": cfg.llm_model, "messages": _llm_messages(prompt), "temperature": 0,
                       "response_format": {"type": "json_object"}}).encode()
    headers = {"content-type": "application/json"}
    if os.environ.get(LLM_KEY_ENV):
        headers["authorization"] = f"Bearer {os.environ[LLM_KEY_ENV]}"
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=cfg.llm_timeout) as response:
            reply = json.loads(response.read())
        content = reply["choices"][0]["message"]["content"]
        answer = json.loads(content[content.find("{"): content.rfind("}") + 1])
    except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as exc:
        raise RuntimeError(f"prompt expansion via {url} failed ({type(exc).__name__}: {exc}): check "
                           f"expand.llm_url, ${LLM_KEY_ENV}, or use expand.backend=minilm") from None
    specified, ungrounded = {}, [str(w) for w in answer.get("ungrounded") or []]
    for attr, values in world.ATTRIBUTES.items():
        value = answer.get(attr)
        if value in values:
            specified[attr] = value
        elif value:  # the model left the vocabulary: say so rather than guess
            ungrounded.append(str(value))
    grounding = [{"span": None, "attribute": a, "value": v, "similarity": None, "anchor": None}
                 for a, v in specified.items()]
    return _result(prompt, specified, seed, distribution, "openai", grounding, ungrounded)
