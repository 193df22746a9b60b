"""Language, realistic tier: infilling sentence 4 of five-sentence stories (issue #16, Tier B).

A seeded story grammar (``StoryGrammar``: characters, goals, obstacles, a twist; about 270
words) writes stories s1..s5: who and where (s1), a goal (s2), where they went and with whom
(s3), an obstacle caused by a culprit, sometimes the companion of s3 (the twist, s4), and how
it was overcome (s5, which depends on s4's obstacle and culprit). The task infills s4.

- Prior p_θ(s4 | s1..s3): a ``TokenTransformer`` (masked diffusion, ``MaskedCategorical``)
  pretrained on ``num_stories`` generated stories. It reads the s1..s3 columns of the
  condition only, so it cannot see s5.
- Posterior: the frozen prior + a zero-initialised residual transformer that also reads s5
  (``ResidualPosterior`` of pipelines/infill_hmm.py): it starts equal to the prior.
- Reward: log r = log p_LM(s5 | s1..s4), a small causal transformer (transformers' GPT-2 built
  from a config, nothing downloaded) trained here on the same stories, whole.
- Target: p_θ(s4 | s1..s3) · r^β / Z(s1..s3, s5); with a perfect prior and LM this is the
  grammar's p(s4 | s1..s3, s5), which ``StoryGrammar.bayes`` enumerates exactly (≤ 400
  sentences per context), so every infill gets its probability under the grammar.

Prior and LM are one checkpoint (``prior_path()``): Ray ships it to nodes that lack it, and
the LM that scores a rollout is the same on every node. The condition is int64 token ids
``[s1 | s2 | s3 | s5]``, each sentence padded with ``<pad>`` to its fixed width: one-hot rows
of ~270 columns per token would not fit a replay store. log Z(c) is therefore not an MLP of the
condition: the shipped config trains with VarGrad, whose log Z(c) is each group's own estimate.

Evaluation (the same ``evaluate`` for RTB, KL-RL and benchmarks/infill_stories.py's baselines):
BLEU-4 and GLEU (nltk, sentence level, against each evaluation story's own s4), the grammar's
probability of the infill, the rate of infills the grammar cannot write after s1..s3, distinct-2
and the samples' mean log r. ``plot`` writes the samples as text, readable, beside its picture.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, \
    model_validator
from torch import Tensor, nn

from pipelines.infill_hmm import PretrainConfig, ResidualPosterior, check_tokens
from rtb_ray.config import AdapterConfig, ConfigError
from rtb_ray.discrete import MaskedCategorical, TokenTransformer
from rtb_ray.pretrain import (PriorCheckpointConfig, load_frozen_bundle, pretrain_prior,
                              progress_bar, read_checkpoint, save_prior)
from rtb_ray.tasks import EvalContext

# -- the grammar's words -----------------------------------------------------------------------
NAMES = {"he": ("tom", "sam", "ben", "max", "leo", "jack", "paul", "nick"),
         "she": ("anna", "mia", "lucy", "emma", "kate", "rose", "lily", "jane")}
POSSESSIVE = {"he": "his", "she": "her"}
TRAITS = ("brave", "kind", "lazy", "shy", "clever", "young", "proud", "curious")
ROLES = ("farmer", "baker", "sailor", "painter", "student", "doctor", "fisher", "teacher")
PLACES = {  # place: its four culprits
    "village": ("goat", "rooster", "donkey", "pig"),
    "forest": ("bear", "wolf", "fox", "badger"),
    "city": ("thief", "pigeon", "rat", "stranger"),
    "island": ("crab", "monkey", "parrot", "pirate"),
    "valley": ("cow", "sheep", "horse", "hawk"),
    "harbor": ("seagull", "seal", "walrus", "smuggler")}
COMPANIONS = ("dog", "cat", "friend", "brother", "sister", "cousin", "uncle", "neighbor")
OPENERS = ("but", "then", "sadly", "suddenly")
ADJECTIVES = ("big", "wild", "hungry", "sneaky", None)  # None: no adjective
REACTIONS = {False: ("chased", "caught", "fed"),  # to a culprit of the place
             True: ("scolded", "forgave", "hugged")}  # to the companion (the twist)
GOALS = {  # goal: (its two destinations, {obstacle: its two fixes}); fixes shared within a goal
    "win the cake contest": (("fair", "market"), {
        "ate the cake": ("baked a new cake", "bought a cake"),
        "burned the cake": ("baked a new cake", "made a pie"),
        "dropped the cake": ("bought a cake", "fixed the icing"),
        "stole the sugar": ("borrowed some sugar", "made a pie")}),
    "catch a big fish": (("lake", "river"), {
        "broke the fishing rod": ("made a new rod", "borrowed a rod"),
        "took the boat": ("borrowed a boat", "fished from the shore"),
        "scared the fish": ("waited all day", "fished from the shore"),
        "ate the bait": ("dug up worms", "waited all day")}),
    "plant a garden": (("hill", "field"), {
        "ate the seeds": ("bought more seeds", "planted potatoes"),
        "stole the shovel": ("dug with a stick", "borrowed a shovel"),
        "trampled the sprouts": ("planted potatoes", "built a fence"),
        "drank the water": ("fetched more water", "waited for rain")}),
    "visit an old friend": (("town", "coast"), {
        "broke the wooden bridge": ("built a raft", "swam across"),
        "blocked the road": ("took a detour", "climbed over it"),
        "stole the map": ("asked for directions", "took a detour"),
        "took the cart": ("walked all night", "borrowed a cart")}),
    "fly a red kite": (("hill", "beach"), {
        "tore the kite": ("sewed the kite", "made a new kite"),
        "cut the string": ("tied the string", "sewed the kite"),
        "took the kite": ("made a new kite", "bought a kite"),
        "chewed the string": ("tied the string", "bought a kite")}),
    "paint a big mural": (("school", "square"), {
        "spilled the paint": ("bought more paint", "used chalk"),
        "stole the brushes": ("painted with fingers", "borrowed some brushes"),
        "smeared the wall": ("washed the wall", "used chalk"),
        "hid the ladder": ("built a ladder", "painted sitting down")}),
    "sing at the festival": (("square", "park"), {
        "stole the songbook": ("sang from memory", "wrote a new song"),
        "broke the drum": ("clapped instead", "borrowed a drum"),
        "cut the cable": ("sang very loudly", "fixed the cable"),
        "scared the crowd": ("sang very loudly", "called them back")}),
    "find a lost ring": (("beach", "cave"), {
        "buried the ring": ("dug all day", "used a magnet"),
        "swallowed the ring": ("waited a week", "asked a vet"),
        "hid the ring": ("searched every corner", "dug all day"),
        "took the lantern": ("searched every corner", "lit a candle")}),
    "cook a fish soup": (("kitchen", "market"), {
        "ate the fish": ("bought another fish", "made bean soup"),
        "spilled the soup": ("cooked it again", "made bean soup"),
        "took the pot": ("borrowed a pot", "cooked on a stone"),
        "stole the salt": ("used sea water", "borrowed some salt")}),
    "build a tree house": (("woods", "yard"), {
        "stole the nails": ("used rope", "bought more nails"),
        "broke the ladder": ("built a ladder", "climbed the tree"),
        "chewed the planks": ("found new planks", "used rope"),
        "took the hammer": ("used a rock", "borrowed a hammer")}),
}
FUNCTION_WORDS = ("was", "a", "in", "the", "one", "day", "wanted", "to", "went", "with", "so",
                  "and", ".")
SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2

Words = tuple[str, ...]


def _longest(phrases: Sequence[str]) -> int:
    return max(len(p.split()) for p in phrases)


# Each sentence's width in the token layout (the longest it can be, "." included):
# s1 "tom was a brave farmer in the village .", s2 "one day he wanted to <goal> .",
# s3 "he went to the <place> with his <companion> .", s4 "<opener> a <adj> <culprit>
# <obstacle> .", s5 "so he <fix> [and <reaction> the <adj> <culprit>] ."
_OBSTACLES = [o for _, obs in GOALS.values() for o in obs]
_FIXES = [f for _, obs in GOALS.values() for fixes in obs.values() for f in fixes]
WIDTHS = {"s1": 9, "s2": 6 + _longest(list(GOALS)), "s3": 9, "s4": 5 + _longest(_OBSTACLES),
          "s5": 8 + _longest(_FIXES)}
SENTENCES = ("s1", "s2", "s3", "s4", "s5")
CONTEXT = ("s1", "s2", "s3", "s5")  # the condition's columns, in order


def columns(sentences: Sequence[str]) -> dict[str, slice]:
    """Where each sentence lies in a row that holds ``sentences`` one after another."""
    out, at = {}, 0
    for s in sentences:
        out[s] = slice(at, at + WIDTHS[s])
        at += WIDTHS[s]
    return out


def column_names(sentences: Sequence[str]) -> list[str]:
    """What each column of such a row is: ``s1[0]``... (for error messages)."""
    return [f"{s}[{i}]" for s in sentences for i in range(WIDTHS[s])]


STORY_COLUMNS, CONTEXT_COLUMNS = columns(SENTENCES), columns(CONTEXT)
STORY_WIDTH, CONTEXT_WIDTH = (sum(WIDTHS[s] for s in SENTENCES),
                              sum(WIDTHS[s] for s in CONTEXT))
PRIOR_CONTEXT = WIDTHS["s1"] + WIDTHS["s2"] + WIDTHS["s3"]  # s1..s3: the prior's columns


def vocabulary_words(num_goals: int, num_places: int) -> list[str]:
    """The tokenizer's words for a grammar of the first ``num_goals`` goals and
    ``num_places`` places: the specials (ids 0, 1, 2), then every word sorted."""
    words = {*FUNCTION_WORDS, *NAMES["he"], *NAMES["she"], *NAMES, *POSSESSIVE.values(),
             *TRAITS, *ROLES, *COMPANIONS, *OPENERS, *(a for a in ADJECTIVES if a),
             *REACTIONS[False], *REACTIONS[True]}
    for place in list(PLACES)[:num_places]:
        words.update([place, *PLACES[place]])
    for goal in list(GOALS)[:num_goals]:
        places, obstacles = GOALS[goal]
        words.update([*goal.split(), *places])
        for obstacle, fixes in obstacles.items():
            words.update(obstacle.split())
            for fix in fixes:
                words.update(fix.split())
    return [*SPECIALS, *sorted(words)]


class Vocabulary:
    """The word tokenizer: one id per word of the grammar, ``<pad>`` (0) filling each sentence
    to its width (an ordinary token: the mask id of the diffusion is V)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words) or tuple(self.words[:3]) != SPECIALS:
            raise ValueError("a vocabulary is the specials then distinct words")

    def __len__(self) -> int:
        return len(self.words)

    @property
    def sha(self) -> str:
        """What a checkpoint records of the vocabulary, to refuse another one."""
        return hashlib.sha256(json.dumps(self.words).encode()).hexdigest()[:16]

    def encode(self, words: Sequence[str], width: int) -> list[int]:
        if len(words) > width:
            raise ValueError(f"{' '.join(words)!r} has {len(words)} words, more than {width}")
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a word of the vocabulary")
        return [self.ids[w] for w in words] + [PAD] * (width - len(words))

    def decode(self, ids: Sequence[int] | Tensor) -> Words:
        """The words of a row of ids, ``<pad>`` dropped wherever it stands."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return tuple(self.words[i] for i in values if i != PAD)

    def text(self, ids: Sequence[int] | Tensor) -> str:
        return " ".join(self.decode(ids))


# -- the grammar -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """What s4 and s5 depend on, as s1..s3 tell it."""

    pronoun: str  # he / she
    place: int
    goal: int
    companion: int


@dataclass(frozen=True)
class Trouble:
    """The choices that write s4."""

    opener: int
    twist: bool  # the culprit is the companion
    culprit: int  # among the place's (0 for the twist)
    adjective: int  # index in ADJECTIVES (the last: none)
    obstacle: int


def distinct2(sentences: Sequence[Words]) -> float:
    """Distinct bigrams / bigrams over ``sentences`` (Li et al., 2016)."""
    bigrams = [b for s in sentences for b in zip(s, s[1:])]
    return len(set(bigrams)) / max(len(bigrams), 1)


def _draw(rng: np.random.Generator, probs: np.ndarray, parent: np.ndarray | None, n: int
          ) -> np.ndarray:
    """One categorical draw per row: from ``probs [K]``, or ``probs[parent[i]]`` of ``[P, K]``."""
    cum = np.cumsum(probs if parent is None else probs[parent], -1)
    u = rng.random(n)[:, None]
    return np.minimum((u > (cum if cum.ndim == 2 else cum[None])).sum(-1), probs.shape[-1] - 1)


class StoryGrammar:
    """A seeded probabilistic story grammar. The words are fixed (``GOALS``, ``PLACES``...);
    the seed draws every conditional distribution from a Dirichlet(``concentration``): which
    goals each role prefers, which culprits each place has most, which obstacles each goal
    meets, how each obstacle is fixed. s4 depends on s1..s3 (the goal's obstacles, the place's
    culprits, the companion for the twist) and s5 on s4 (the obstacle's fix, and in the long
    ending, the culprit as s4 described it), so s5 tells the infill apart: in a long ending
    the reward pins the infill down to the opener, which the prior's samples seldom hit (what
    SIR-k needs). Everything is enumerable: ≤ 400 possible s4 per context (``infills``),
    ≤ 8 endings per s4 (``endings``)."""

    def __init__(self, num_goals: int = len(GOALS), num_places: int = len(PLACES), seed: int = 0,
                 concentration: float = 1.0, twist_prob: float = 0.2,
                 long_ending_prob: float = 0.5) -> None:
        self.goals = list(GOALS)[:num_goals]
        self.places = list(PLACES)[:num_places]
        self.vocab = Vocabulary(vocabulary_words(num_goals, num_places))
        self.twist_prob, self.long_ending_prob = twist_prob, long_ending_prob
        rng = np.random.default_rng(seed)

        def dirichlet(*shape: int) -> np.ndarray:
            return rng.dirichlet(np.full(shape[-1], concentration), shape[:-1] or None)

        g = len(self.goals)
        self.p_name, self.p_trait = dirichlet(16), dirichlet(len(TRAITS))
        self.p_role, self.p_place = dirichlet(len(ROLES)), dirichlet(len(self.places))
        self.p_goal = dirichlet(len(ROLES), g)  # [role, goal]: s2 depends on s1
        self.p_dest = dirichlet(g, 2)
        self.p_companion, self.p_opener = dirichlet(len(COMPANIONS)), dirichlet(len(OPENERS))
        self.p_culprit = dirichlet(len(self.places), 4)  # [place, culprit]
        self.p_adjective = dirichlet(len(ADJECTIVES))
        self.p_obstacle = dirichlet(g, 4)  # [goal, obstacle]
        self.p_fix = dirichlet(g, 4, 2)  # [goal, obstacle, fix]: s5 depends on s4
        self.p_reaction = dirichlet(2, 3)  # [twist, reaction]
        # s1..s3 → their choices, for reading a context back from its words
        self._s1 = {self.s1(n, t, r, p): (n, p) for n in range(16) for t in range(len(TRAITS))
                    for r in range(len(ROLES)) for p in range(len(self.places))}
        self._s2 = {self.s2(pr, gl): (pr, gl) for pr in NAMES for gl in range(g)}
        # (destinations are shared between goals: s3 names one, s2 the goal)
        self._s3 = {self.s3(pr, gl, d, c): (pr, GOALS[self.goals[gl]][0][d], c) for pr in NAMES
                    for gl in range(g) for d in range(2) for c in range(len(COMPANIONS))}
        self._infills: dict[Context, dict[Words, list[tuple[Trouble, float]]]] = {}
        self._bayes: dict[tuple[Context, Words], dict[Words, float]] = {}

    # -- sentences from choices ----------------------------------------------------------------
    @staticmethod
    def pronoun(name: int) -> str:
        return "he" if name < 8 else "she"

    def s1(self, name: int, trait: int, role: int, place: int) -> Words:
        who = NAMES[self.pronoun(name)][name % 8]
        return (who, "was", "a", TRAITS[trait], ROLES[role], "in", "the", self.places[place], ".")

    def s2(self, pronoun: str, goal: int) -> Words:
        return ("one", "day", pronoun, "wanted", "to", *self.goals[goal].split(), ".")

    def s3(self, pronoun: str, goal: int, dest: int, companion: int) -> Words:
        return (pronoun, "went", "to", "the", GOALS[self.goals[goal]][0][dest], "with",
                POSSESSIVE[pronoun], COMPANIONS[companion], ".")

    def _culprit(self, c: Context, t: Trouble) -> tuple[str, str]:
        """The culprit's determiner in s4 and its noun."""
        if t.twist:
            return POSSESSIVE[c.pronoun], COMPANIONS[c.companion]
        return "a", PLACES[self.places[c.place]][t.culprit]

    def _obstacle(self, c: Context, t: Trouble) -> str:
        return list(GOALS[self.goals[c.goal]][1])[t.obstacle]

    def s4(self, c: Context, t: Trouble) -> Words:
        det, noun = self._culprit(c, t)
        adjective = ADJECTIVES[t.adjective]
        return (OPENERS[t.opener], det, *([adjective] if adjective else []), noun,
                *self._obstacle(c, t).split(), ".")

    def s5(self, c: Context, t: Trouble, fix: int, reaction: int | None) -> Words:
        words = ("so", c.pronoun, *GOALS[self.goals[c.goal]][1][self._obstacle(c, t)][fix].split())
        if reaction is None:
            return (*words, ".")
        det = POSSESSIVE[c.pronoun] if t.twist else "the"
        adjective = ADJECTIVES[t.adjective]
        return (*words, "and", REACTIONS[t.twist][reaction], det,
                *([adjective] if adjective else []), self._culprit(c, t)[1], ".")

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[Words, ...]]:
        """``n`` stories, each five sentences of words (ancestral sampling, vectorised per
        choice)."""
        name = _draw(rng, self.p_name, None, n)
        trait, role = _draw(rng, self.p_trait, None, n), _draw(rng, self.p_role, None, n)
        place = _draw(rng, self.p_place, None, n)
        goal = _draw(rng, self.p_goal, role, n)
        dest = _draw(rng, self.p_dest, goal, n)
        companion = _draw(rng, self.p_companion, None, n)
        opener = _draw(rng, self.p_opener, None, n)
        twist = rng.random(n) < self.twist_prob
        culprit = np.where(twist, 0, _draw(rng, self.p_culprit, place, n))
        adjective = _draw(rng, self.p_adjective, None, n)
        obstacle = _draw(rng, self.p_obstacle, goal, n)
        fix = _draw(rng, self.p_fix.reshape(-1, 2), goal * 4 + obstacle, n)
        long = rng.random(n) < self.long_ending_prob
        reaction = _draw(rng, self.p_reaction, twist.astype(int), n)
        stories = []
        for i in range(n):
            pr = self.pronoun(int(name[i]))
            c = Context(pr, int(place[i]), int(goal[i]), int(companion[i]))
            t = Trouble(int(opener[i]), bool(twist[i]), int(culprit[i]), int(adjective[i]),
                        int(obstacle[i]))
            stories.append((self.s1(int(name[i]), int(trait[i]), int(role[i]), int(place[i])),
                            self.s2(pr, int(goal[i])),
                            self.s3(pr, int(goal[i]), int(dest[i]), int(companion[i])),
                            self.s4(c, t),
                            self.s5(c, t, int(fix[i]), int(reaction[i]) if long[i] else None)))
        return stories

    # -- enumeration ---------------------------------------------------------------------------
    def context(self, s1: Words, s2: Words, s3: Words) -> Context | None:
        """The choices s4 and s5 depend on, read from s1..s3; None when the grammar cannot
        write these three sentences (a word out of place, pronouns that disagree...)."""
        one, two, three = self._s1.get(tuple(s1)), self._s2.get(tuple(s2)), self._s3.get(tuple(s3))
        if one is None or two is None or three is None:
            return None
        name, place = one
        if (not self.pronoun(name) == two[0] == three[0]
                or three[1] not in GOALS[self.goals[two[1]]][0]):
            return None
        return Context(two[0], place, two[1], three[2])

    def _troubles(self, c: Context) -> dict[Words, list[tuple[Trouble, float]]]:
        """Every s4 after context ``c``: its words → the choices that write it, and their
        probabilities."""
        if c not in self._infills:
            out: dict[Words, list[tuple[Trouble, float]]] = {}
            culprits = [(True, 0, self.twist_prob)] + [
                (False, k, (1 - self.twist_prob) * self.p_culprit[c.place, k]) for k in range(4)]
            for o in range(len(OPENERS)):
                for twist, k, p_c in culprits:
                    for a in range(len(ADJECTIVES)):
                        for ob in range(4):
                            t = Trouble(o, twist, k, a, ob)
                            p = (self.p_opener[o] * p_c * self.p_adjective[a]
                                 * self.p_obstacle[c.goal, ob])
                            out.setdefault(self.s4(c, t), []).append((t, float(p)))
            self._infills[c] = out
        return self._infills[c]

    def infills(self, c: Context) -> dict[Words, float]:
        """p(s4 | s1..s3) of every s4 the grammar can write after context ``c``."""
        return {s4: sum(p for _, p in ts) for s4, ts in self._troubles(c).items()}

    def _endings_of(self, c: Context, t: Trouble) -> dict[Words, float]:
        out: dict[Words, float] = {}
        for fix in range(2):
            p_fix = self.p_fix[c.goal, t.obstacle, fix]
            endings = [(None, 1 - self.long_ending_prob)] + [
                (r, self.long_ending_prob * self.p_reaction[int(t.twist), r]) for r in range(3)]
            for reaction, p in endings:
                s5 = self.s5(c, t, fix, reaction)
                out[s5] = out.get(s5, 0.0) + float(p_fix * p)
        return out

    def endings(self, c: Context, s4: Words) -> dict[Words, float]:
        """p(s5 | s1..s4) of every s5 after context ``c`` and ``s4`` (empty if the grammar
        cannot write ``s4`` there)."""
        troubles = self._troubles(c).get(tuple(s4), [])
        total = sum(p for _, p in troubles)
        out: dict[Words, float] = {}
        for t, p in troubles:
            for s5, q in self._endings_of(c, t).items():
                out[s5] = out.get(s5, 0.0) + p / total * q
        return out

    def bayes(self, c: Context, s5: Words) -> dict[Words, float]:
        """The Bayes infill: p(s4 | s1..s3, s5) ∝ p(s4 | s1..s3) p(s5 | s1..s4), every s4 with
        positive probability (empty if no s4 leads to ``s5``)."""
        key = (c, tuple(s5))
        if key not in self._bayes:
            joint = {s4: sum(p * self._endings_of(c, t).get(tuple(s5), 0.0) for t, p in ts)
                     for s4, ts in self._troubles(c).items()}
            total = sum(joint.values())
            self._bayes[key] = {s4: p / total for s4, p in joint.items() if p > 0}
        return self._bayes[key]


# -- the reward language model -----------------------------------------------------------------
def _transformers():
    """transformers, offline: it must never try to download anything."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


def compact(tokens: Tensor, parts: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ids with ``<pad>`` anywhere → the same ids with every ``<pad>`` moved to the
    end (order kept), and ``parts`` (a label per id) moved alongside."""
    order = torch.sort((tokens == PAD).int(), dim=1, stable=True).indices
    return tokens.gather(1, order), parts.gather(1, order)


def lm_log_probs(lm: nn.Module, tokens: Tensor) -> Tensor:
    """log p_LM(token | the tokens before it) of every token but the first, ``[n, S − 1]``, of
    rows ``tokens [n, S]`` whose ``<pad>`` are all at the end (``compact``)."""
    logits = lm(input_ids=tokens, attention_mask=(tokens != PAD).long()).logits[:, :-1]
    return F.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def lm_log_prob(lm: nn.Module, tokens: Tensor, scored: Tensor) -> Tensor:
    """Σ log p_LM(token | the tokens before it) over the ids where ``scored`` is true, per row."""
    return torch.where(scored[:, 1:], lm_log_probs(lm, tokens), 0.0).sum(1)


def story_tokens(context: Tensor, s4: Tensor) -> tuple[Tensor, Tensor]:
    """``<bos>`` s1 s2 s3 s4 s5 ``<eos>`` from the condition ``[n, CONTEXT_WIDTH]`` and infills
    ``[n, L]``, compacted; and which ids belong to s5 (what the reward scores)."""
    n = context.shape[0]
    c = CONTEXT_COLUMNS
    pieces = [torch.full((n, 1), BOS), context[:, :c["s5"].start], s4, context[:, c["s5"]],
              torch.full((n, 1), EOS)]
    tokens = torch.cat([p.to(context.device) for p in pieces], 1)
    parts = torch.zeros_like(tokens, dtype=torch.bool)
    at = 1 + c["s5"].start + s4.shape[1]
    parts[:, at:at + WIDTHS["s5"]] = True
    tokens, parts = compact(tokens, parts)
    return tokens, parts & (tokens != PAD)


# -- config ------------------------------------------------------------------------------------
class RewardConfig(BaseModel):
    """The reward LM (GPT-2 built from a config) and its training on whole stories."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dim: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> "RewardConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


class Config(PriorCheckpointConfig):
    """Settings of the story-infilling task (the ``task:`` section of a run config)."""

    name: Literal["infill_stories"] = "infill_stories"
    num_goals: int = Field(len(GOALS), ge=1, le=len(GOALS),
                           description="the grammar's first goals (fewer: a smaller vocabulary)")
    num_places: int = Field(len(PLACES), ge=1, le=len(PLACES))
    grammar_seed: int = Field(0, description="draws the grammar's distributions")
    concentration: float = Field(1.0, gt=0, description="Dirichlet of each of them")
    twist_prob: float = Field(0.2, ge=0, le=1, description="the culprit is the companion")
    long_ending_prob: float = Field(0.5, ge=0, le=1, description="s5 also names the culprit")
    data_seed: int = Field(1, description="draws the stories")
    num_stories: int = Field(40_000, ge=16, le=1_000_000,
                             description="stories the prior and the reward LM train on; RTB "
                                         "draws its contexts from them")
    num_eval_stories: int = Field(32, ge=1, le=1000, description="held-out evaluation stories")
    eval_stories: list[list[int]] | None = Field(
        None, min_length=1, description="explicit evaluation stories: token ids s1..s5, each "
                                        "sentence padded to its width (default: drawn)")
    unmask: Literal["one", "schedule"] = "one"
    num_steps: int | None = Field(None, ge=1, le=1000,
                                  description="T for unmask=schedule (default L); 'one': L")
    dim: int = Field(64, ge=1, description="the prior transformer's width")
    depth: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    residual_dim: int = Field(64, ge=1, description="the posterior's residual transformer")
    residual_depth: int = Field(2, ge=0)
    residual_reads: Literal["story", "ending"] = Field(
        "story", description="the residual reads s1..s3 and s5, or s5 alone (cheaper)")
    pretrain: PretrainConfig = PretrainConfig()
    reward: RewardConfig = RewardConfig()

    @field_validator("eval_stories")
    @classmethod
    def _tokens(cls, v: list[list[int]] | None, info: ValidationInfo) -> list[list[int]] | None:
        goals, places = info.data.get("num_goals"), info.data.get("num_places")
        if v is None or goals is None or places is None:  # a size that failed has its own error
            return v
        check_tokens("", v, STORY_WIDTH, len(vocabulary_words(goals, places)),
                     column_names(SENTENCES))
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "Config":
        if self.unmask == "one" and self.num_steps not in (None, WIDTHS["s4"]):
            raise ValueError(f"num_steps: unmask 'one' takes L = {WIDTHS['s4']} steps")
        for width, name in ((self.dim, "dim"), (self.residual_dim, "residual_dim")):
            if width % self.heads:
                raise ValueError(f"{name} ({width}) must be a multiple of heads ({self.heads})")
        return self

    @property
    def steps(self) -> int:
        return self.num_steps or WIDTHS["s4"]

    def spec(self) -> dict:
        """Everything the checkpoint (prior and reward LM) depends on."""
        words = vocabulary_words(self.num_goals, self.num_places)
        return {"vocab_size": len(words), "vocabulary_sha": Vocabulary(words).sha,
                "widths": WIDTHS, **self.model_dump(include={
                    "num_goals", "num_places", "grammar_seed", "concentration", "twist_prob",
                    "long_ending_prob", "data_seed", "num_stories", "unmask", "dim", "depth",
                    "heads", "pretrain", "reward"}), "num_steps": self.steps}


# -- the task ----------------------------------------------------------------------------------
class InfillStoriesTask:
    name = "infill_stories"
    progress_metrics = ("bleu4", "gleu", "grammar_prob", "invalid_rate", "distinct2")
    baseline_metric = "invalid_rate"

    def __init__(self, config: Config) -> None:
        self.config = c = config
        self.grammar = StoryGrammar(c.num_goals, c.num_places, c.grammar_seed, c.concentration,
                                    c.twist_prob, c.long_ending_prob)
        self.vocab = self.grammar.vocab
        self.length = WIDTHS["s4"]
        self.family = MaskedCategorical(self.length, len(self.vocab), c.unmask, c.steps)
        self.stories, self.eval_stories = self._stories()
        self.train_contexts = self.context_of(self.stories)
        self._models: tuple[nn.Module, nn.Module] | None = None
        self._stats: dict | None = None

    # -- data --------------------------------------------------------------------------------
    def encode_story(self, story: Sequence[Words]) -> list[int]:
        return [i for s, words in zip(SENTENCES, story) for i in self.vocab.encode(words,
                                                                                 WIDTHS[s])]

    def _stories(self) -> tuple[Tensor, Tensor]:
        """The training stories ``[num_stories, STORY_WIDTH]`` int64 (checked: ids, widths) and
        the evaluation stories: the config's (checked against the grammar) or drawn after
        them, none of whose contexts (s1..s3, s5) occurs in training."""
        c, width, v = self.config, STORY_WIDTH, len(self.vocab)
        names = column_names(SENTENCES)
        rng = np.random.default_rng(c.data_seed)
        train = check_tokens("task stories (generated)", [self.encode_story(s) for s in
                                                          self.grammar.sample(c.num_stories, rng)],
                             width, v, names)
        if c.eval_stories is not None:
            held = check_tokens("task.eval_stories", c.eval_stories, width, v, names)
            for i, row in enumerate(held):
                if (why := self._unwritable(row)) is not None:
                    raise ConfigError(f"task.eval_stories: row {i}: {why}")
            return train, held
        seen = {tuple(r) for r in self.context_of(train).tolist()}
        found: dict[tuple[int, ...], list[int]] = {}
        for _ in range(100):
            for story in self.grammar.sample(4 * c.num_eval_stories, rng):
                row = self.encode_story(story)
                key = tuple(self.context_of(torch.tensor([row]))[0].tolist())
                if key not in seen:
                    found.setdefault(key, row)
            if len(found) >= c.num_eval_stories:
                return train, torch.tensor(list(found.values())[:c.num_eval_stories])
        raise ConfigError(f"task: the grammar gave only {len(found)} held-out stories, fewer "
                          f"than the {c.num_eval_stories} asked for")

    def _unwritable(self, row: Tensor) -> str | None:
        """Why the grammar cannot write this story, or None."""
        s = {k: self.vocab.decode(row[sl]) for k, sl in STORY_COLUMNS.items()}
        ctx = self.grammar.context(s["s1"], s["s2"], s["s3"])
        if ctx is None:
            told = " / ".join(" ".join(s[k]) for k in ("s1", "s2", "s3"))
            return f"the grammar cannot write s1..s3 {told!r}"
        if s["s4"] not in self.grammar.infills(ctx):
            return f"the grammar cannot write s4 {' '.join(s['s4'])!r} after s1..s3"
        if s["s5"] not in self.grammar.endings(ctx, s["s4"]):
            return f"the grammar cannot write s5 {' '.join(s['s5'])!r} after s1..s4"
        return None

    @staticmethod
    def context_of(stories: Tensor) -> Tensor:
        """Stories → their conditions, ``[n, CONTEXT_WIDTH]``: s1 s2 s3 s5."""
        return torch.cat([stories[:, STORY_COLUMNS[s]] for s in CONTEXT], 1)

    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        rows = torch.randint(0, self.train_contexts.shape[0], (n,), generator=generator)
        return self.train_contexts[rows]

    def eval_conditions(self) -> Tensor:
        return self.context_of(self.eval_stories)

    def known_terminals(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Training stories' own s4 with their conditions (the ``dataset`` source): off-policy
        infills where the target has its mass. RTB still fits p_θ · r^β, not this data."""
        rows = self.stories[torch.randint(0, self.stories.shape[0], (n,), generator=generator)]
        return rows[:, STORY_COLUMNS["s4"]], self.context_of(rows)

    def references(self) -> dict[tuple[int, ...], Tensor]:
        """Each evaluation condition → the s4 of its story (the reference for BLEU and GLEU)."""
        return {tuple(c.tolist()): s[STORY_COLUMNS["s4"]]
                for c, s in zip(self.eval_conditions(), self.eval_stories)}

    def _read(self, cond_row: Sequence[int]) -> tuple[Context | None, Words]:
        """A condition's grammar context (None: not one the grammar writes) and its s5."""
        row = torch.as_tensor(cond_row)
        s = {k: self.vocab.decode(row[sl]) for k, sl in CONTEXT_COLUMNS.items()}
        return self.grammar.context(s["s1"], s["s2"], s["s3"]), s["s5"]

    # -- the prior and the reward LM -------------------------------------------------------------
    def new_prior_network(self) -> TokenTransformer:
        c = self.config
        return TokenTransformer(self.length, len(self.vocab), c.steps,
                                context_length=PRIOR_CONTEXT, dim=c.dim, depth=c.depth,
                                heads=c.heads)

    def new_reward_lm(self) -> nn.Module:
        r = self.config.reward
        tf = _transformers()
        config = tf.GPT2Config(vocab_size=len(self.vocab), n_positions=STORY_WIDTH + 2,
                               n_embd=r.dim, n_layer=r.layers, n_head=r.heads,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        torch.manual_seed(r.seed)
        return tf.GPT2LMHeadModel(config)

    def _bundle(self) -> nn.ModuleDict:
        return nn.ModuleDict({"prior": self.new_prior_network(), "reward": self.new_reward_lm()})

    def prior_path(self) -> Path:
        return self.config.prior_path()

    def _load(self) -> tuple[nn.Module, nn.Module]:
        """The prior and the reward LM, frozen (pretrained first if missing)."""
        if self._models is None:
            bundle, self._stats = load_frozen_bundle(self.config, self.name, self.pretrain,
                                                     self._bundle(), self._check_vocabulary)
            self._models = (bundle["prior"], bundle["reward"])
        return self._models

    def prior(self) -> TokenTransformer:
        return self._load()[0]

    def reward_lm(self) -> nn.Module:
        return self._load()[1]

    def _check_vocabulary(self, path: Path) -> None:
        """A checkpoint over another vocabulary is refused by name (its ids mean other words)."""
        ckpt = read_checkpoint(path, "an rtb-ray prior checkpoint")
        spec = ckpt.get("spec") if isinstance(ckpt, dict) else None
        theirs = spec.get("vocabulary_sha") if isinstance(spec, dict) else None
        if theirs is not None and theirs != self.vocab.sha:
            raise ValueError(f"prior_checkpoint {path}: a prior over another vocabulary "
                             f"({spec.get('vocab_size')} words, {theirs}); this grammar's has "
                             f"{len(self.vocab)} words, {self.vocab.sha} (refused)")

    def pretrain(self, progress: bool = True) -> dict:
        """Trains the prior (the masked family's ELBO of s4 given s1..s3) and the reward LM
        (next-token cross-entropy on whole stories), on the same stories; saves both in one
        checkpoint, with how close each is to the grammar on held-out stories."""
        c = self.config
        start = time.perf_counter()
        torch.manual_seed(c.pretrain.seed)
        prior = self.new_prior_network()
        s4, stories = STORY_COLUMNS["s4"], self.stories

        def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
            rows = stories[torch.randint(0, stories.shape[0], (n,), generator=gen)]
            return rows[:, s4], self.context_of(rows)

        losses = pretrain_prior(self.family, prior, sample, steps=c.pretrain.steps,
                                batch_size=c.pretrain.batch_size, lr=c.pretrain.lr,
                                seed=c.pretrain.seed, progress=progress)
        prior_s = time.perf_counter() - start
        lm = self.new_reward_lm()
        lm_losses = self._train_reward_lm(lm, progress)
        stats = {"pretrain_seconds": time.perf_counter() - start, "prior_seconds": prior_s,
                 "prior_last_loss": losses[-1], "reward_last_loss": lm_losses[-1],
                 **self._fit_stats(prior.eval(), lm.eval())}
        bundle = self._bundle()
        bundle["prior"].load_state_dict(prior.state_dict())
        bundle["reward"].load_state_dict(lm.state_dict())
        save_prior(c.prior_path(), self.name, c.spec(), bundle, stats)
        return stats

    def _train_reward_lm(self, lm: nn.Module, progress: bool) -> list[float]:
        """AdamW, cosine learning rate, on whole stories: ``<bos>`` s1..s5 ``<eos>``."""
        r = self.config.reward
        gen = torch.Generator().manual_seed(r.seed)
        opt = torch.optim.AdamW(lm.parameters(), lr=r.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s / r.steps, 1.0))))
        lm.train()
        losses = []
        for step in progress_bar(range(r.steps), "train reward LM", progress):
            rows = self.stories[torch.randint(0, self.stories.shape[0], (r.batch_size,),
                                              generator=gen)]
            tokens, _ = story_tokens(self.context_of(rows), rows[:, STORY_COLUMNS["s4"]])
            tokens = tokens[:, :int((tokens != PAD).sum(1).max())]
            # the mean next-token cross-entropy over every real token after <bos>
            loss = -lm_log_probs(lm, tokens)[tokens[:, 1:] != PAD].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == r.steps - 1:
                losses.append(loss.item())
        return losses

    @torch.no_grad()
    def _fit_stats(self, prior: nn.Module, lm: nn.Module, n: int = 512) -> dict[str, float]:
        """How close the models are to the grammar on ``n`` fresh stories (not trained on):
        the LM's mean log p(s5 | s1..s4) against the grammar's, and the prior's samples
        (invalid rate, the grammar's mean p(s4 | s1..s3) of them against its expectation)."""
        rng = np.random.default_rng(self.config.data_seed + 10_007)
        stories = torch.tensor([self.encode_story(s) for s in self.grammar.sample(n, rng)])
        cond, s4 = self.context_of(stories), stories[:, STORY_COLUMNS["s4"]]
        lm_lp = self._log_reward_with(lm, s4, cond)
        grammar_lp, prior_p, grammar_p, invalid = [], [], [], 0
        z = self.family.sample(prior, n, cond=cond,
                               generator=torch.Generator().manual_seed(0))[0][:, -1]
        for row, ref, sample in zip(cond.tolist(), s4, z):
            ctx, s5 = self._read(row)
            assert ctx is not None  # the grammar wrote it
            grammar_lp.append(np.log(self.grammar.endings(ctx, self.vocab.decode(ref))[s5]))
            infills = self.grammar.infills(ctx)
            p = infills.get(self.vocab.decode(sample), 0.0)
            invalid += p == 0
            prior_p.append(p)
            grammar_p.append(sum(q * q for q in infills.values()))
        return {"reward_log_prob": lm_lp.double().mean().item(),
                "grammar_log_prob_s5": float(np.mean(grammar_lp)),
                "prior_invalid_rate": invalid / n,
                "prior_grammar_prob": float(np.mean(prior_p)),
                "grammar_prior_prob": float(np.mean(grammar_p))}

    # -- reward ------------------------------------------------------------------------------
    @staticmethod
    def _log_reward_with(lm: nn.Module, x: Tensor, cond: Tensor, chunk: int = 2048) -> Tensor:
        device = next(lm.parameters()).device
        out = []
        for i in range(0, x.shape[0], chunk):
            tokens, scored = story_tokens(cond[i:i + chunk].to(device), x[i:i + chunk].to(device))
            out.append(lm_log_prob(lm, tokens, scored))
        return torch.cat(out) if out else torch.zeros(0, device=device)

    @torch.no_grad()
    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """log p_LM(s5 | s1..s4) of infills ``x [n, L]`` (``<pad>`` anywhere is dropped) in
        contexts ``cond``."""
        if cond is None:
            raise ValueError("infill_stories is conditional: log_reward needs cond")
        v = len(self.vocab)
        if x.numel() and (x.min() < 0 or x.max() >= v):
            raise ValueError(f"infills must be tokens 0..{v - 1}")
        lm = self.reward_lm()
        if next(lm.parameters()).device != x.device:
            lm.to(x.device)
        return self._log_reward_with(lm, x.long(), cond.long()).float()

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> None:
        """Unknown: Z(c) sums over all V^L infills of the learned prior."""
        return None

    # -- evaluation --------------------------------------------------------------------------
    def grammar_figures(self, x: Tensor, cond: Tensor) -> dict[str, np.ndarray]:
        """Per sample: the grammar's p(infill | s1..s3, s5), whether the grammar can write it
        after s1..s3 at all, and whether it is any sentence the grammar writes."""
        bayes_p, valid = np.zeros(x.shape[0]), np.zeros(x.shape[0], dtype=bool)
        for i, (row, z) in enumerate(zip(cond.tolist(), x)):
            ctx, s5 = self._read(row)
            if ctx is None:
                continue
            words = self.vocab.decode(z)
            valid[i] = words in self.grammar.infills(ctx)
            bayes_p[i] = self.grammar.bayes(ctx, s5).get(words, 0.0)
        return {"bayes_p": bayes_p, "valid": valid}

    @torch.no_grad()
    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: EvalContext | None = None) -> dict[str, float]:
        """Infills ``x [n, L]`` of evaluation conditions ``cond`` (each story the same number
        of times): BLEU-4 (smoothed: nltk's method 1) and GLEU against the story's own s4;
        ``grammar_prob``: the grammar's p(infill | s1..s3, s5), mean (``grammar_log_prob``: the
        mean log over the infills with p > 0; absent when none has); ``invalid_rate``: infills
        the grammar cannot write after s1..s3; ``distinct2``: distinct bigrams / bigrams over
        one infill per story (a test set's distinct-n), averaged over the sets;
        ``distinct2_within``: the same among each story's infills, averaged over stories;
        ``bayes_grammar_prob``: what exact samples of the grammar's p(s4 | s1..s3, s5) score."""
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from nltk.translate.gleu_score import sentence_gleu

        if cond is None:
            raise ValueError("infill_stories is conditional: evaluate needs cond")
        x, cond = x.cpu().long(), cond.cpu().long()
        refs = self.references()
        smooth = SmoothingFunction().method1
        bleu, gleu = np.zeros(x.shape[0]), np.zeros(x.shape[0])
        by_context: dict[tuple[int, ...], list[Words]] = {}
        for i, (row, z) in enumerate(zip(cond.tolist(), x)):
            if tuple(row) not in refs:
                raise ValueError(f"evaluate: cond row {i} is not an evaluation condition")
            ref, hyp = list(self.vocab.decode(refs[tuple(row)])), list(self.vocab.decode(z))
            bleu[i] = sentence_bleu([ref], hyp, smoothing_function=smooth) if hyp else 0.0
            gleu[i] = sentence_gleu([ref], hyp) if hyp else 0.0
            by_context.setdefault(tuple(row), []).append(tuple(hyp))
        g = self.grammar_figures(x, cond)
        groups = list(by_context.values())
        # distinct-2 as NLG reports it: over one infill per story (the j-th of each), averaged
        # over j; within a story, the calibrated answer is less diverse than the prior
        sets = [[group[j] for group in groups] for j in range(min(map(len, groups)))]
        return {"bleu4": float(bleu.mean()), "gleu": float(gleu.mean()),
                **self._grammar_metrics(g, by_context),
                "distinct2": float(np.mean([distinct2(s) for s in sets])),
                "distinct2_within": float(np.mean([distinct2(s) for s in groups]))}

    def _grammar_metrics(self, g: dict[str, np.ndarray],
                         by_context: dict[tuple[int, ...], list[Words]]) -> dict[str, float]:
        bayes_self = []  # Σ_z p(z | c)²: E_{z ~ Bayes}[p(z | c)], per evaluation context
        for row in by_context:
            context, s5 = self._read(row)
            assert context is not None  # an evaluation story: the grammar wrote it
            bayes_self.append(sum(p * p for p in self.grammar.bayes(context, s5).values()))
        out = {"grammar_prob": float(g["bayes_p"].mean()),
               "invalid_rate": float(1 - g["valid"].mean()),
               "bayes_grammar_prob": float(np.mean(bayes_self))}
        if (g["bayes_p"] > 0).any():  # log 0 is no number: the mean over the others
            out["grammar_log_prob"] = float(np.log(g["bayes_p"][g["bayes_p"] > 0]).mean())
        return out

    def sample_bayes(self, cond: Tensor, generator: torch.Generator) -> Tensor:
        """Exact samples of the grammar's p(s4 | s1..s3, s5), one per row of ``cond``: the
        Bayes-optimal infills (a reference row of the benchmark)."""
        out = []
        for row in cond.cpu().tolist():
            ctx, s5 = self._read(row)
            if ctx is None:
                raise ValueError("sample_bayes: a condition the grammar does not write")
            dist = self.grammar.bayes(ctx, s5)
            k = int(torch.multinomial(torch.tensor(list(dist.values()), dtype=torch.float64), 1,
                                      generator=generator))
            out.append(self.vocab.encode(list(dist)[k], self.length))
        return torch.tensor(out, dtype=torch.int64)

    # -- the posterior network -----------------------------------------------------------------
    def posterior_network(self, prior: nn.Module, adapter: AdapterConfig) -> ResidualPosterior:
        """The frozen prior + a zero-initialised residual transformer over s1..s3, s5 (or s5
        alone, ``residual_reads: ending``) and x_t."""
        if adapter.kind != "full":
            raise ConfigError(f"train.adapter.kind: {adapter.kind} does not apply to "
                              f"infill_stories (its posterior is the frozen prior plus a "
                              f"residual network)")
        c = self.config
        offset, width = ((0, CONTEXT_WIDTH) if c.residual_reads == "story"
                         else (CONTEXT_COLUMNS["s5"].start, WIDTHS["s5"]))
        residual = TokenTransformer(self.length, len(self.vocab), c.steps,
                                    context_length=width, context_offset=offset,
                                    dim=c.residual_dim, depth=c.residual_depth, heads=c.heads)
        return ResidualPosterior(copy.deepcopy(prior), residual)

    # -- samples, readable ---------------------------------------------------------------------
    def sample_text(self, x: Tensor, cond: Tensor, contexts: int = 8, per_context: int = 5
                    ) -> str:
        """For the first ``contexts`` conditions: the story around the gap, its reference s4
        and ``per_context`` sampled infills, each with the grammar's p(infill | s1..s3, s5)."""
        refs = self.references()
        lines = []
        rows = cond.cpu().long()
        for key in list(dict.fromkeys(tuple(r) for r in rows.tolist()))[:contexts]:
            at = (rows == torch.tensor(key)).all(1).nonzero()[:, 0][:per_context]
            cols = CONTEXT_COLUMNS
            context = torch.tensor(key)
            lines += [" ".join(self.vocab.text(context[cols[s]]) for s in ("s1", "s2", "s3")),
                      f"  [s4]  {self.vocab.text(refs[key])}" if key in refs else "  [s4]",
                      f"  {self.vocab.text(context[cols['s5']])}"]
            g = self.grammar_figures(x[at].cpu(), rows[at])
            for z, p, ok in zip(x[at], g["bayes_p"], g["valid"]):
                lines.append(f"    - {self.vocab.text(z)}   (p_grammar {p:.3f}"
                             f"{'' if ok else ', invalid'})")
            lines.append("")
        return "\n".join(lines)

    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        """The samples as text: ``<path>.txt`` (eight contexts) and, for four of them, a
        picture ``path`` (PNG) of the same text."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if cond is None:
            raise ValueError("infill_stories is conditional: plot needs cond")
        path = Path(path)
        path.with_suffix(".txt").write_text(f"{title}\n\n{self.sample_text(x, cond)}")
        text = self.sample_text(x, cond, contexts=4, per_context=4)
        wrapped = "\n".join(textwrap.fill(line, 110, subsequent_indent="      ")
                            for line in text.splitlines())
        fig = plt.figure(figsize=(10, 0.2 * (wrapped.count("\n") + 3)), dpi=100)
        fig.text(0.01, 0.99, f"{title}\n\n{wrapped}", family="monospace", fontsize=8,
                 va="top")
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> InfillStoriesTask:
    return InfillStoriesTask(config)
