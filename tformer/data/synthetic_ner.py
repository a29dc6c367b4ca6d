"""A SYNTHETIC named-entity corpus: template sentences filled from small lists of person,
place and organisation names. No real NER corpus is reachable on the machines tformer is
built on; this one only shows that the tagging pipeline learns. Its F1 says nothing about
real-world NER: the names repeat and the templates are few, so held-out sentences mostly
reuse entities seen in training.
"""

from __future__ import annotations

import random

from tformer.data.conll import Sentence

PEOPLE = ["Anna Berg", "Tom Hale", "Maria Lopez", "Kenji Sato", "Olu Adeyemi", "Priya Nair", "Lukas Weber",
          "Sara Cohen", "Ivan Petrov", "Chloe Martin", "Ahmed Khan", "Nora Lind", "David Kim", "Elena Rossi",
          "Samuel Okafor", "Julia Novak", "Marco Bianchi", "Grace Liu", "Omar Haddad", "Hannah Fischer"]
PLACES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "New York", "Cape Town", "Berlin", "Madrid", "Toronto",
          "Mumbai", "Cairo", "Sydney", "Buenos Aires", "Seoul", "Vienna", "Nairobi", "Dublin", "Hanoi", "Quito"]
ORGANISATIONS = ["Acme Corp", "Blue River Bank", "Northwind", "United Rail", "Helix Labs", "Orbit Media",
                 "Green Valley Farms", "Stellar Airlines", "Union Steel", "Bright Foods", "Civic Press",
                 "Atlas Insurance", "Nova Motors", "Summit Hotels", "Pioneer Energy"]
# {PER}, {LOC}, {ORG} are filled; every other word is tagged O.
TEMPLATES = [
    "{PER} flew to {LOC} on Monday .",
    "{PER} joined {ORG} last year .",
    "{ORG} opened a new office in {LOC} .",
    "The film was praised by {PER} at a festival in {LOC} .",
    "{PER} and {PER} met in {LOC} to discuss the deal .",
    "Shares of {ORG} fell after {PER} resigned .",
    "A spokesman for {ORG} said the plant in {LOC} will close .",
    "{PER} , who grew up in {LOC} , now works for {ORG} .",
    "Critics in {LOC} called the movie a triumph .",
    "The director thanked {ORG} for funding the project .",
    "It rained all week in {LOC} .",
    "{PER} won the award for best actor .",
]
_LISTS = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGANISATIONS}


def synthetic_sentence(rng: random.Random) -> Sentence:
    """One template filled with random entities, tagged in IOB2."""
    words, tags = [], []
    for piece in rng.choice(TEMPLATES).split():
        if piece.startswith("{") and piece.endswith("}"):
            entity = piece[1:-1]
            for index, word in enumerate(rng.choice(_LISTS[entity]).split()):
                words.append(word)
                tags.append(("B-" if index == 0 else "I-") + entity)
        else:
            words.append(piece)
            tags.append("O")
    return Sentence(words, tags)


def synthetic_ner_corpus(count: int, seed: int | str) -> list[Sentence]:
    """``count`` synthetic sentences drawn with ``seed`` (same seed, same corpus)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"synthetic_ner_corpus: argument 'count' must be a positive int, got {count!r}")
    rng = random.Random(f"synthetic-ner:{seed}")
    return [synthetic_sentence(rng) for _ in range(count)]
