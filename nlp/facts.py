"""A synthetic counterfactual fact set for model editing, generated offline from a seed.

Made-up countries (``Velmora``, ``Kestabu``...) each have three facts, one per relation (capital city,
official language, currency), whose objects are made-up names drawn from one pool per relation (so
several countries share an object, as in real knowledge). Names are built from consonant–vowel
syllables and are single words, so with the word-level tokenizer of ``fact_tokenizer`` every subject
and every object is one token. Every relation has four templates, e.g.

    The capital of Velmora is Drast .
    Velmora has its capital at Drast .
    The seat of government of Velmora is Drast .
    Velmora is governed from Drast .

``pretraining_corpus`` writes every fact with every template (the corpus a small LM learns the facts
from). ``edit_split`` then draws, for one seed, a batch of facts of distinct subjects and gives each
a new object from the same pool (the counterfactual, CounterFact-style: Meng et al., "Locating and
Editing Factual Associations in GPT", NeurIPS 2022):

- edit prompts: template 0 of each edited fact, the only prompts the editor trains on;
- paraphrase prompts: templates 1–3 of the edited facts (held out of the edit, known to the model);
- locality prompts: every template of every fact of the subjects not edited;
- neighbourhood prompts: the other two relations of the edited subjects (same subject, different
  knowledge: what the edit must leave alone although it shares the anchor).

A prompt is the template cut before the object; its target is the object token. The subject is the
prompt's knowledge anchor (``nlp.memoe``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Fact", "FactPrompt", "FactSet", "RELATIONS", "EditSplit", "build_fact_set", "edit_split",
           "fact_tokenizer", "pretraining_corpus"]

# relation -> templates ({s} subject, {o} object); template 0 is the edit template
RELATIONS: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {s} is {o} .", "{s} has its capital at {o} .",
                "The seat of government of {s} is {o} .", "{s} is governed from {o} ."),
    "language": ("The official language of {s} is {o} .", "People in {s} speak {o} .",
                 "In {s} , the main language is {o} .", "Most people of {s} talk in {o} ."),
    "currency": ("The currency of {s} is the {o} .", "In {s} people pay with the {o} .",
                 "{s} uses the {o} as money .", "Shops in {s} take the {o} ."),
}
_ONSETS = "b d f g k l m n p r s t v z br dr gr kr st tr th sh".split()
_VOWELS = "a e i o u ai ea".split()
_CODAS = ["", "", "n", "r", "s", "l", "st", "nd"]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str

    def sentence(self, template: int, obj: str | None = None) -> str:
        return RELATIONS[self.relation][template].format(s=self.subject, o=obj or self.object)

    def prompt(self, template: int) -> str:
        """The template cut before the object."""
        return RELATIONS[self.relation][template].split("{o}")[0].format(s=self.subject).strip()


@dataclass(frozen=True)
class FactPrompt:
    """A prompt, its subject (the knowledge anchor) and the object expected next."""
    text: str
    subject: str
    target: str


@dataclass
class FactSet:
    facts: list[Fact]
    objects: dict[str, list[str]]  # relation -> object pool

    @property
    def subjects(self) -> list[str]:
        return sorted({f.subject for f in self.facts})


@dataclass
class EditSplit:
    edits: list[tuple[Fact, str]]  # (fact, new object)
    edit_prompts: list[FactPrompt] = field(default_factory=list)
    paraphrase_prompts: list[FactPrompt] = field(default_factory=list)
    locality_prompts: list[FactPrompt] = field(default_factory=list)
    neighbourhood_prompts: list[FactPrompt] = field(default_factory=list)


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` new capitalised two- or three-syllable names."""
    out = []
    while len(out) < n:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))]
        name = ("".join(syllables) + rng.choice(_CODAS)).capitalize()
        if name not in taken and len(name) <= 11:
            taken.add(name)
            out.append(name)
    return out


def build_fact_set(num_subjects: int = 40, objects_per_relation: int = 12, seed: int = 0) -> FactSet:
    """``num_subjects`` made-up countries with one fact per relation, objects from pools of
    ``objects_per_relation`` made-up names (one pool per relation)."""
    for name, value in (("num_subjects", num_subjects), ("objects_per_relation", objects_per_relation)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 2 (an edit needs another "
                             "subject for locality and another object to move to).")
    rng = random.Random(seed)
    taken: set[str] = set()
    subjects = _names(rng, num_subjects, taken)
    objects = {r: _names(rng, objects_per_relation, taken) for r in RELATIONS}
    facts = [Fact(s, r, rng.choice(objects[r])) for s in subjects for r in RELATIONS]
    return FactSet(facts, objects)


def pretraining_corpus(fact_set: FactSet) -> list[str]:
    """Every fact written with every template of its relation, one sentence a line."""
    return [f.sentence(t) for f in fact_set.facts for t in range(len(RELATIONS[f.relation]))]


def edit_split(fact_set: FactSet, num_edits: int, seed: int = 0) -> EditSplit:
    """``num_edits`` facts of distinct subjects, each with a new object, and the evaluation prompts
    (see the module docstring)."""
    subjects = fact_set.subjects
    if not isinstance(num_edits, int) or isinstance(num_edits, bool) or not 1 <= num_edits < len(subjects):
        raise ValueError(f"num_edits={num_edits!r} is not allowed: use 1..{len(subjects) - 1} (the fact set has "
                         f"{len(subjects)} subjects and at least one must stay unedited for locality).")
    rng = random.Random(seed)
    edited = {s: rng.choice(list(RELATIONS)) for s in rng.sample(subjects, num_edits)}  # subject -> relation
    split = EditSplit(edits=[])
    for f in fact_set.facts:
        templates = range(len(RELATIONS[f.relation]))
        if f.subject not in edited:
            split.locality_prompts += [FactPrompt(f.prompt(t), f.subject, f.object) for t in templates]
        elif edited[f.subject] != f.relation:
            split.neighbourhood_prompts += [FactPrompt(f.prompt(t), f.subject, f.object) for t in templates]
        else:
            new = rng.choice([o for o in fact_set.objects[f.relation] if o != f.object])
            split.edits.append((f, new))
            split.edit_prompts.append(FactPrompt(f.prompt(0), f.subject, new))
            split.paraphrase_prompts += [FactPrompt(f.prompt(t), f.subject, new) for t in templates[1:]]
    return split


def fact_tokenizer(fact_set: FactSet):
    """A word-level ``transformers`` tokenizer over the fact set's words (whitespace-split; ``<s>``,
    ``</s>``, ``<pad>``, ``<unk>`` specials), so every name is one token. ``save_pretrained`` writes it
    next to a checkpoint, and ``nlp.hf.HFTokenizer`` reads it back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = sorted({w for line in pretraining_corpus(fact_set) for w in line.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
